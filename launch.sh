#!/usr/bin/env bash
# LoRA Studio launcher for Linux and macOS.
#   ./launch.sh              set up .venv on first run, then start the app and open the browser
#   ./launch.sh test         set up the same way (plus test tools), then run the whole test suite
#   ./launch.sh repair       delete .venv and install everything again (the versions LoRA Studio was tested with)
#   ./launch.sh --share ...  any other arguments go to app.py (see ./launch.sh --help)
# Environment:
#   LORA_STUDIO_TORCH   pip arguments for torch; unset: chosen for this machine (CUDA build for an NVIDIA GPU,
#                       ROCm for AMD, CPU build otherwise), see lora_studio/torch_build.py. Example:
#                       LORA_STUDIO_TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
#   LORA_STUDIO_PYTHON  the Python used to create .venv (default: python3; 3.11 or newer)
# Packages are installed with requirements.lock as constraints: exactly the versions the test suite passed with.
set -euo pipefail
cd "$(dirname "$0")"

pause_on_error() {
  local code=$?
  if [ $code -ne 0 ] && [ -t 0 ] && [ -z "${CI:-}" ]; then
    echo
    echo "LoRA Studio stopped with an error (exit code $code). Read the message above."
    read -r -p "Press Enter to close this window..." _ || true
  fi
}
trap pause_on_error EXIT

PY="${LORA_STUDIO_PYTHON:-python3}"
VENV=".venv"
LOCK="requirements.lock"
mode="app"
case "${1:-}" in
  test) mode="test"; shift ;;
  repair|--repair) mode="repair"; shift ;;
esac
req_files=(requirements.txt)
[ "$mode" = "test" ] && req_files+=(requirements-dev.txt)

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "Python 3.11 or newer is needed but '$PY' was not found. Install it from python.org and run this again."
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "LoRA Studio needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1). Install a newer Python from"
  echo "python.org, or point LORA_STUDIO_PYTHON to one, then run this again."
  exit 1
fi
if [ "$mode" = "repair" ]; then
  echo "Repair: deleting $VENV and installing everything again ..."
  rm -rf "$VENV"
  req_files=(requirements.txt)
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[1/3] First run: creating the virtual environment in $VENV ..."
  "$PY" -m venv "$VENV"
fi
# Re-install only when a requirements file, the lock or the torch choice changed since the last install.
stamp="$VENV/.installed-$mode"
[ "$mode" = "repair" ] && stamp="$VENV/.installed-app"
want="$(cat "${req_files[@]}" "$LOCK" | sha256sum | cut -c1-16) ${LORA_STUDIO_TORCH:-auto}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  torch_args="$("$VENV/bin/python" lora_studio/torch_build.py)"
  echo "[2/3] Installing PyTorch ($torch_args) ..."
  # shellcheck disable=SC2086
  if ! "$VENV/bin/python" -m pip install --progress-bar on $torch_args; then
    if [ -n "${LORA_STUDIO_TORCH:-}" ]; then exit 1; fi
    echo "PyTorch's own download server could not be used; trying PyPI's default build instead ..."
    "$VENV/bin/python" -m pip install --progress-bar on "torch>=2.4,<2.14"
  fi
  echo "[3/3] Installing LoRA Studio's requirements (the tested versions in $LOCK) ..."
  for f in "${req_files[@]}"; do "$VENV/bin/python" -m pip install --progress-bar on -r "$f" -c "$LOCK"; done
  echo "$want" > "$stamp"
fi

case "$mode" in
  test)
    # One pytest worker per core, at most 4 (each test runs one torch thread; whole files stay on one worker so
    # their module fixtures are built once). LORA_STUDIO_TEST_WORKERS=1 runs in one process; a -n given wins.
    workers="${LORA_STUDIO_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}"
    [ "$workers" -gt 4 ] && workers=4
    parallel=()
    [ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile)
    exec "$VENV/bin/python" -m pytest ${parallel[@]+"${parallel[@]}"} "$@" ;;
  repair) echo "Repaired. Start LoRA Studio with ./launch.sh"; exit 0 ;;
esac
exec "$VENV/bin/python" app.py "$@"
