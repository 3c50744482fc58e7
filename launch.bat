@echo off
REM LoRA Studio launcher for Windows: double-click to start.
REM   launch.bat              set up .venv on first run, then start the app and open the browser
REM   launch.bat test         set up the same way (plus test tools), then run the test suite
REM   launch.bat repair       delete .venv and install everything again (the versions LoRA Studio was tested with)
REM   launch.bat --share ...  other arguments go to app.py
REM PyTorch: with an NVIDIA GPU the matching CUDA build is chosen by itself (lora_studio\torch_build.py).
REM To choose yourself, set LORA_STUDIO_TORCH before the first run (or before "repair"), e.g.:
REM   set LORA_STUDIO_TORCH=torch --index-url https://download.pytorch.org/whl/cu128
REM Packages are installed with requirements.lock as constraints: exactly the versions the tests passed with.
setlocal enabledelayedexpansion
cd /d "%~dp0"
set "MODE=app"
if /I "%~1"=="test" (set "MODE=test" & shift)
if /I "%~1"=="repair" (set "MODE=repair" & shift)
if /I "%~1"=="--repair" (set "MODE=repair" & shift)
set "PY=%LORA_STUDIO_PYTHON%"
if "%PY%"=="" set "PY=py -3"

%PY% -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" 2>nul
if errorlevel 1 (
  echo LoRA Studio needs Python 3.11 or newer. Install it from python.org ^(tick "Add python.exe to PATH"^),
  echo or set LORA_STUDIO_PYTHON to its python.exe, then start this again.
  goto :error
)
if "%MODE%"=="repair" (
  echo Repair: deleting .venv and installing everything again ...
  if exist ".venv" rmdir /s /q ".venv"
)
if not exist ".venv\Scripts\python.exe" (
  echo [1/3] First run: creating the virtual environment in .venv ...
  %PY% -m venv .venv || goto :error
)

REM Re-install only when a requirements file, the lock or the torch choice changed since the last install.
set "REQS=requirements.txt"
if "%MODE%"=="test" set "REQS=requirements-dev.txt"
set "STAMP=.venv\.installed-%MODE%"
if "%MODE%"=="repair" set "STAMP=.venv\.installed-app"
copy /b requirements.txt+requirements-dev.txt+requirements.lock ".venv\.hash-input" >nul
set "WANT="
for /f "skip=1 delims=" %%h in ('certutil -hashfile ".venv\.hash-input" SHA256') do if not defined WANT set "WANT=%%h"
del ".venv\.hash-input"
set "TORCH_KEY=%LORA_STUDIO_TORCH%"
if "!TORCH_KEY!"=="" set "TORCH_KEY=auto"
set "WANT=!WANT: =!-%MODE%-!TORCH_KEY!"
set "HAVE="
if exist "%STAMP%" set /p HAVE=<"%STAMP%"
if not "!HAVE!"=="!WANT!" (
  set "TORCH_ARGS="
  for /f "usebackq delims=" %%a in (`.venv\Scripts\python.exe lora_studio\torch_build.py`) do set "TORCH_ARGS=%%a"
  echo [2/3] Installing PyTorch ^(!TORCH_ARGS!^) ...
  .venv\Scripts\python.exe -m pip install --progress-bar on !TORCH_ARGS!
  if errorlevel 1 (
    if not "%LORA_STUDIO_TORCH%"=="" goto :error
    echo PyTorch's own download server could not be used; trying PyPI's default build instead ...
    .venv\Scripts\python.exe -m pip install --progress-bar on "torch>=2.4,<2.14" || goto :error
  )
  echo [3/3] Installing LoRA Studio's requirements ^(the tested versions in requirements.lock^) ...
  .venv\Scripts\python.exe -m pip install --progress-bar on -r !REQS! -c requirements.lock || goto :error
  >"%STAMP%" echo !WANT!
)
if "%MODE%"=="repair" (
  echo Repaired. Start LoRA Studio by double-clicking launch.bat.
  pause
  exit /b 0
)

set "ARGS="
:collect
if "%~1"=="" goto :run
set "ARGS=!ARGS! %1"
shift
goto :collect
:run
if "%MODE%"=="test" (
  REM One pytest worker per core, at most 4; LORA_STUDIO_TEST_WORKERS=1 runs in one process.
  set "WORKERS=%NUMBER_OF_PROCESSORS%"
  if defined LORA_STUDIO_TEST_WORKERS set "WORKERS=%LORA_STUDIO_TEST_WORKERS%"
  if !WORKERS! GTR 4 set "WORKERS=4"
  set "PARALLEL="
  if !WORKERS! GTR 1 set "PARALLEL=-n !WORKERS! --dist loadfile"
  .venv\Scripts\python.exe -m pytest !PARALLEL! !ARGS! || goto :error
) else (
  .venv\Scripts\python.exe app.py !ARGS! || goto :error
)
exit /b 0
:error
echo.
echo LoRA Studio stopped with an error. Read the message above.
pause
exit /b 1
