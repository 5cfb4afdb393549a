#!/usr/bin/env bash
# Fails when keel_pdp/api differs from what proto/ generates.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r "$here/keel_pdp/api" "$tmp/before"
"$here/.venv/bin/python" "$here/scripts/gen_proto.py"
if ! diff -r -x __pycache__ "$tmp/before" "$here/keel_pdp/api" >/dev/null; then
  diff -r -x __pycache__ "$tmp/before" "$here/keel_pdp/api" | head -40 || true
  echo "generated code in keel_pdp/api is stale: run 'make proto' and commit" >&2
  exit 1
fi
echo "proto drift check: keel_pdp/api matches proto/"
