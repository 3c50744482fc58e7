#!/usr/bin/env bash
# LoRA Studio launcher for Linux and macOS.
#   ./launch.sh              set up .venv on first run, then start the app and open the browser
#   ./launch.sh test         set up the same way (plus test tools), then run the whole test suite
#   ./launch.sh --share ...  any other arguments go to app.py (see ./launch.sh --help)
# Environment:
#   LORA_STUDIO_TORCH   pip spec for torch (default "torch>=2.4"). For an NVIDIA GPU pick the CUDA build, e.g.
#                       LORA_STUDIO_TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
#   LORA_STUDIO_PYTHON  the Python used to create .venv (default: python3)
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
mode="app"
if [ "${1:-}" = "test" ]; then mode="test"; shift; fi
req_files=(requirements.txt)
[ "$mode" = "test" ] && req_files+=(requirements-dev.txt)

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "Python 3.10 or newer is needed but '$PY' was not found. Install it from python.org and run this again."
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[1/3] First run: creating the virtual environment in $VENV ..."
  "$PY" -m venv "$VENV"
fi
# Re-install only when a requirements file changed since the last successful install.
stamp="$VENV/.installed-$mode"
want="$(cat "${req_files[@]}" | sha256sum | cut -c1-16) ${LORA_STUDIO_TORCH:-default}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[2/3] Installing PyTorch (${LORA_STUDIO_TORCH:-torch>=2.4}) ..."
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --progress-bar on ${LORA_STUDIO_TORCH:-"torch>=2.4"}
  echo "[3/3] Installing LoRA Studio's requirements ..."
  for f in "${req_files[@]}"; do "$VENV/bin/python" -m pip install --progress-bar on -r "$f"; done
  echo "$want" > "$stamp"
fi

if [ "$mode" = "test" ]; then
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" app.py "$@"
