@echo off
REM LoRA Studio launcher for Windows: double-click to start.
REM   launch.bat              set up .venv on first run, then start the app and open the browser
REM   launch.bat test         set up the same way (plus test tools), then run the test suite
REM   launch.bat --share ...  other arguments go to app.py
REM For an NVIDIA GPU set the CUDA build of PyTorch before the first run, e.g.:
REM   set LORA_STUDIO_TORCH=torch --index-url https://download.pytorch.org/whl/cu124
setlocal enabledelayedexpansion
cd /d "%~dp0"
set "MODE=app"
if /I "%~1"=="test" (set "MODE=test" & shift)
if "%LORA_STUDIO_TORCH%"=="" set "LORA_STUDIO_TORCH=torch>=2.4"
set "PY=%LORA_STUDIO_PYTHON%"
if "%PY%"=="" set "PY=py -3"

if not exist ".venv\Scripts\python.exe" (
  echo [1/3] First run: creating the virtual environment in .venv ...
  %PY% -m venv .venv || (echo Python 3.10 or newer is needed: install it from python.org, tick "Add to PATH". & goto :error)
)
set "STAMP=.venv\.installed-%MODE%"
if not exist "%STAMP%" (
  echo [2/3] Installing PyTorch ^(%LORA_STUDIO_TORCH%^) ...
  .venv\Scripts\python.exe -m pip install --progress-bar on %LORA_STUDIO_TORCH% || goto :error
  echo [3/3] Installing LoRA Studio's requirements ...
  .venv\Scripts\python.exe -m pip install --progress-bar on -r requirements.txt || goto :error
  if "%MODE%"=="test" (.venv\Scripts\python.exe -m pip install -r requirements-dev.txt || goto :error)
  echo done> "%STAMP%"
)
set "ARGS="
:collect
if "%~1"=="" goto :run
set "ARGS=!ARGS! %1"
shift
goto :collect
:run
if "%MODE%"=="test" (
  .venv\Scripts\python.exe -m pytest !ARGS! || goto :error
) else (
  .venv\Scripts\python.exe app.py !ARGS! || goto :error
)
exit /b 0
:error
echo.
echo LoRA Studio stopped with an error. Read the message above.
pause
exit /b 1
