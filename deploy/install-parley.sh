#!/bin/sh
# Installs Parley into /opt/venv from the builder's wheels (no index: every wheel is already there) and
# creates the unprivileged user that owns the model cache. Run as root by both final targets of
# deploy/Dockerfile, so they stay the same.
set -eu
python=$1 wheels=$2
groupadd --system --gid 10001 parley
useradd --system --uid 10001 --gid parley --home-dir /home/parley --create-home parley
"$python" -m venv /opt/venv
/opt/venv/bin/pip install --no-cache-dir --no-index --find-links "$wheels" parley
mkdir -p "$PARLEY_CACHE_DIR"
chown parley:parley "$PARLEY_CACHE_DIR"
