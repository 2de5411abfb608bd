# Sourced by scripts/serve and scripts/test: picks a Python 3.11+ the project may install into.
# A Debian system Python is "externally managed" (PEP 668): use a virtual environment in .venv there.
pick_python() {
  local py="${PYTHON:-python3}"
  if [ -n "${VIRTUAL_ENV:-}" ]; then echo "$py"; return; fi
  if [ -x .venv/bin/python ]; then echo .venv/bin/python; return; fi
  local managed
  managed=$("$py" -c 'import os,sysconfig;print(os.path.exists(os.path.join(sysconfig.get_path("stdlib"),"EXTERNALLY-MANAGED")))')
  if [ "$managed" = "True" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
    if ! "$py" -m venv .venv >&2; then
      # Debian ships venv (ensurepip) separately.
      rm -rf .venv
      echo "installing python3-venv (apt)" >&2
      DEBIAN_FRONTEND=noninteractive as_root apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-venv >&2
      "$py" -m venv .venv >&2 || { echo "could not create .venv with $py" >&2; exit 1; }
    fi
    echo .venv/bin/python; return
  fi
  echo "$py"
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root for: $*" >&2; return 1; fi
}
