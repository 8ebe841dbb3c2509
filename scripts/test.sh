#!/usr/bin/env bash
# bash scripts/test.sh            # set up, then run the whole test suite (CPU; real DeepSpeed, 2 ranks)
# bash scripts/test.sh -k parity  # extra arguments go to pytest
# bash scripts/test.sh -m "not slow"   # the fast lane: unit tests and one-process runs, 2-3 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
fi
exit "$status"
