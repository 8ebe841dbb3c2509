#!/usr/bin/env bash
# bash .ci/slurm.sh              # start the 2-node localhost Slurm cluster, run tests/test_slurm.py, stop it
# bash .ci/slurm.sh -k preempt   # extra arguments go to pytest
# PYTHON=/path/to/venv/bin/python bash .ci/slurm.sh   # use that interpreter instead of ./.venv
#
# Runs as root on a Debian CI machine (apt installs Slurm, munge and shellcheck). Runs the whole
# file: the `slurm`-marked cluster tests and the static ones, whose shellcheck is installed here.
# HARNESS_SLURM_REQUIRED=1 turns a cluster that does not answer into a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v shellcheck >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends shellcheck
fi
# PYTHON: an interpreter with the harness's dependencies; by default the repository's .venv.
if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then bash scripts/setup.sh; fi
  PYTHON=.venv/bin/python
fi
export PYTHON

started=$(date +%s)
bash .ci/slurm_cluster.sh start
trap 'bash .ci/slurm_cluster.sh stop' EXIT
set +e
HARNESS_SLURM_REQUIRED=1 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_slurm.py "$@"
status=$?
set -e
echo ".ci/slurm.sh: pytest exited $status after $(($(date +%s) - started))s"
exit "$status"
