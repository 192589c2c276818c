#!/bin/sh
# The README's test command: install everything, then run the whole suite.
# TARPIT_REQUIRE_ALL=1 turns "binary missing, skip" into a failure: here everything is installed.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
TARPIT_REQUIRE_ALL=1 python3 -m pytest -q -p no:cacheprovider "$@"
