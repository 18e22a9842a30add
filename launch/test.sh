#!/usr/bin/env bash
# Set up (or reuse) the environment, check lint and formatting, run the whole test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k reader -x`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

ruff check .
ruff format --check .
python -m pytest -q -p no:cacheprovider "$@"
