#!/bin/sh
# Installs what tarpit-smtpd, its demo and its tests need on a fresh Debian/Ubuntu machine (run as root):
# Debian packages for the real components the tests start, then this distribution with its Python deps.
set -eu
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq ucspi-tcp tinycdb redis-server swaks exim4-daemon-light dnsmasq-base build-essential openssl >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore ".[test,plot]"
