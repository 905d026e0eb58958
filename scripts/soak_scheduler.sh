#!/usr/bin/env bash
# Long run of the scheduler's hypothesis state machine (tests/test_scheduler_properties.py).
# Usage: scripts/soak_scheduler.sh [EXAMPLES]   (default 5000; CI runs 60)
set -euo pipefail
cd "$(dirname "$0")/.."
JAXSERVE_HYPOTHESIS_EXAMPLES="${1:-5000}" python -m pytest -q -p no:cacheprovider \
  tests/test_scheduler_properties.py --hypothesis-show-statistics
