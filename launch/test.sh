#!/usr/bin/env bash
# Set up (or reuse) the environment, check lint and formatting, run the whole test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k reader -x`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

# One intra-op thread per process: the tests run up to two ranks plus reader workers on the
# machine's cores, and torch's default of one thread per core had them spin-waiting on each
# other (the finetune tests ran 7x slower on a busy 2-core machine). Set it to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

ruff check .
ruff format --check .
python -m pytest -q -p no:cacheprovider "$@"
