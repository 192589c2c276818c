#!/bin/sh
# The README's test command: install everything (scripts/setup.sh), then run the whole suite with the
# installed venv's Python.  $TARPIT_BINDIR (/usr/local/bin) goes first on PATH, so the tests and the
# tcpserver they start run the installed tarpit-smtpd, tarpitctl and tarpit-sink, whatever other
# Python (pyenv, a venv) is on PATH.
# TEST_REQUIRE_ALL=1 turns "binary missing, skip" into a failure: here everything is installed.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
prefix=${TARPIT_PREFIX:-/opt/tarpit-smtpd}
bindir=${TARPIT_BINDIR:-/usr/local/bin}
PATH="$bindir:$PATH" TEST_REQUIRE_ALL=1 "$prefix/bin/python" -m pytest -q -p no:cacheprovider "$@"
