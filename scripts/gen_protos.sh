#!/usr/bin/env bash
# Generates the Python package for protos/ into OUT_DIR (whose last component must be "parley").
# With --check REF, generates into OUT_DIR and fails when it differs from REF.
set -euo pipefail
py=$1 out=$2
root=$(dirname "$out")
mkdir -p "$root"
rm -rf "$out"
protos=$(find protos -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -Iprotos --python_out="$root" --pyi_out="$root" --grpc_python_out="$root" $protos
find "$out" -type d -exec touch {}/__init__.py \;
if [ "${3:-}" = "--check" ]; then
  if ! diff -r -x __pycache__ "$out" "$4" >/dev/null; then
    echo "parley/ is stale: run 'make protos' and commit the result" >&2
    diff -r -x __pycache__ "$out" "$4" | head -20 >&2
    exit 1
  fi
  echo "parley/ is up to date with protos/"
fi
