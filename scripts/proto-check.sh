#!/usr/bin/env bash
# Fails when keel_pdp/api differs from what proto/ generates. Generates into a scratch
# copy: the check never writes into the working tree.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r "$here/keel_pdp/api" "$tmp/generated"
find "$tmp/generated" -name '*.py' ! -name '__init__.py' -delete
find "$tmp/generated" -name '*.pyi' -delete
if ! "$here/.venv/bin/python" "$here/scripts/gen_proto.py" "$tmp/generated" >"$tmp/gen.log" 2>&1
then
  cat "$tmp/gen.log" >&2
  exit 1
fi
if ! diff -r -x __pycache__ "$here/keel_pdp/api" "$tmp/generated" >/dev/null; then
  diff -r -x __pycache__ "$here/keel_pdp/api" "$tmp/generated" | head -40 || true
  echo "generated code in keel_pdp/api is stale: run 'make proto' and commit" >&2
  exit 1
fi
echo "proto drift check: keel_pdp/api matches proto/"
