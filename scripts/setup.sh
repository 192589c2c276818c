#!/bin/sh
# Installs tarpit-smtpd, and what its demo and tests need, on a Debian/Ubuntu machine (run as root):
#   1. Debian packages: the real components the tests start, and python3-venv;
#   2. a virtual environment at $TARPIT_PREFIX (default /opt/tarpit-smtpd), made from Debian's own
#      /usr/bin/python3 (Debian's python3 refuses a system-wide pip install: PEP 668), with this
#      source tree installed into it (a regular install, not editable) with the extras [test,plot];
#   3. links in $TARPIT_BINDIR (default /usr/local/bin) to its programs tarpit-smtpd, tarpitctl and
#      tarpit-sink: tcpserver run files and the tests find them there;
#   4. the man pages tarpit-smtpd(8), tarpitctl(8), tarpit.toml(5) in $TARPIT_PREFIX/share/man, linked
#      into $TARPIT_MANDIR (default /usr/local/share/man).
# Running it again upgrades in place (docs/deployment.md: Install, Upgrade, Uninstall).
# TARPIT_PYTHON picks another interpreter for the venv (Python >= 3.11; default /usr/bin/python3).
set -eu
umask 022   # the venv must be readable by the user tcpserver runs the wrapper as (qmaild)
cd "$(dirname "$0")/.."
src=$(pwd)
prefix=${TARPIT_PREFIX:-/opt/tarpit-smtpd}
bindir=${TARPIT_BINDIR:-/usr/local/bin}
python=${TARPIT_PYTHON:-/usr/bin/python3}
programs="tarpit-smtpd tarpitctl tarpit-sink"
packages="ucspi-tcp tinycdb redis-server swaks exim4-daemon-light dnsmasq-base oidentd build-essential openssl python3 python3-venv man-db"

if command -v apt-get >/dev/null 2>&1; then
    missing=
    for p in $packages; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        export DEBIAN_FRONTEND=noninteractive
        # wait for a concurrent apt/dpkg instead of failing at once
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq $packages >/dev/null
    fi
fi

[ -x "$python" ] || { echo "setup.sh: $python not found (Debian: apt-get install python3 python3-venv)" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "setup.sh: tarpit-smtpd needs Python >= 3.11; $python is $("$python" -V 2>&1)" >&2; exit 1; }

mkdir -p "$(dirname "$prefix")" "$bindir"
# One install at a time (two test runs started together would otherwise race in the venv).
exec 9>"${TMPDIR:-/tmp}/tarpit-smtpd-setup.lock"
flock 9

# (Re)create the venv unless it is there, works, and was made from $python; an existing good one
# is kept, and the install below upgrades it in place.
if ! { [ -x "$prefix/bin/python" ] && "$prefix/bin/python" -c 'import sys' 2>/dev/null &&
       [ "$(readlink -f "$prefix/bin/python")" = "$(readlink -f "$python")" ]; }; then
    echo "setup.sh: creating the venv $prefix from $python"
    "$python" -m venv --clear "$prefix"
fi

# Build from a clean copy of the work tree: pip builds a local directory in place, and a stale
# build/ there could install modules that no longer exist in the tree.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -C "$src" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./.hypothesis --exclude=./.pytest_cache --exclude=./.venv -cf - . |
    tar -C "$tmp" -xf -
# pip reinstalls a package given as a directory even when its version number did not change, so the
# tree's code is what gets installed; a dependency changes only when the tree asks for a newer one.
"$prefix/bin/python" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    --upgrade "$tmp[test,plot]"

# tarpit-smtpd starts once per connection: replace pip's launcher (site, then `import re`) with
# one that runs python -I -S and puts the venv's site-packages on the path itself: ~10 ms less
# per connection (bench/run.py), and no PYTHON* variable of the environment reaches it.
purelib=$("$prefix/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
cat >"$prefix/bin/tarpit-smtpd.new" <<LAUNCHER
#!$prefix/bin/python -IS
# Written by tarpit-smtpd's scripts/setup.sh in place of pip's launcher: see there.
import sys
sys.path.append("$purelib")
from tarpit_wrappers.tarpit_smtpd import entry
entry()
LAUNCHER
chmod 755 "$prefix/bin/tarpit-smtpd.new"
mv -f "$prefix/bin/tarpit-smtpd.new" "$prefix/bin/tarpit-smtpd"
for p in $programs; do
    [ -x "$prefix/bin/$p" ] || { echo "setup.sh: $prefix/bin/$p missing after the install" >&2; exit 1; }
    if [ -e "$bindir/$p" ] && [ ! -L "$bindir/$p" ]; then
        echo "setup.sh: replacing $bindir/$p (not a link: an older install?) with a link to $prefix/bin/$p"
    fi
    ln -sfn "$prefix/bin/$p" "$bindir/$p"
done
# Man pages, built from docs/man and the code's own tables, linked where man(1) looks.
mandir=${TARPIT_MANDIR:-/usr/local/share/man}
"$prefix/bin/python" "$tmp/scripts/manpages.py" "$prefix/share/man" >/dev/null
for page in "$prefix"/share/man/man*/*; do
    section=$(basename "$(dirname "$page")")
    mkdir -p "$mandir/$section"
    ln -sfn "$page" "$mandir/$section/$(basename "$page")"
done
echo "setup.sh: installed $("$prefix/bin/python" -m pip show tarpit-smtpd 2>/dev/null | sed -n 's/^Version: //p') in $prefix; $programs linked in $bindir"
