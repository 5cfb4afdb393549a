#!/usr/bin/env bash
# Lint and type-check exactly the tracked files (what CI will see).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t py < <(git ls-files '*.py')
.venv/bin/ruff check --force-exclude "${py[@]}"
mapfile -t typed < <(git ls-files 'keel_pdp/*.py' 'tests/*.py' 'scripts/*.py' 'bench/*.py' | grep -v '^keel_pdp/api/')
.venv/bin/mypy "${typed[@]}"
