#!/bin/sh
# The README's demo: tarpit-smtpd in front of a real SMTP backend (tarpit-sink, delivering to a
# Maildir) under a real tcpserver on 127.0.0.1.  A well-behaved client delivers; a bot with a
# dynamic-looking reverse name is tarpitted at RCPT and gives up.  It runs what scripts/setup.sh
# installed: the venv $TARPIT_PREFIX (/opt/tarpit-smtpd) and its programs linked in $TARPIT_BINDIR
# (/usr/local/bin).  Set TARPIT_DEMO_NO_SETUP=1 to skip the install step.
set -eu
cd "$(dirname "$0")/.."
[ -n "${TARPIT_DEMO_NO_SETUP:-}" ] || sh scripts/setup.sh
prefix=${TARPIT_PREFIX:-/opt/tarpit-smtpd}
bindir=${TARPIT_BINDIR:-/usr/local/bin}
python="$prefix/bin/python"
[ -x "$python" ] || { echo "demo.sh: no venv in $prefix: run sh scripts/setup.sh" >&2; exit 1; }
PATH="$bindir:$PATH"
export PATH
dir=$(mktemp -d /tmp/tarpit-demo.XXXXXX)
mkdir "$dir/control"
cp control-examples/s25r-allow "$dir/control/"
# tcprules gives each loopback source address the reverse name a real client would have.
cat > "$dir/tcp.smtp" <<'RULES'
127.0.0.2:allow,TCPREMOTEHOST="mail.example.org"
127.0.0.3:allow,TCPREMOTEHOST="p1234-ipbf56abcdef.tokyo.ocn.ne.jp",TARPIT="5"
:allow
RULES
tcprules "$dir/tcp.smtp.cdb" "$dir/tcp.smtp.tmp" < "$dir/tcp.smtp"
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "== 1. tcpserver on 127.0.0.1:$port runs tarpit-smtpd in front of tarpit-sink, a real SMTP server"
echo "      on stdin/stdout that delivers to a Maildir.  tcprules (tcp.smtp) gives 127.0.0.2 the reverse name"
echo "      of a mail server and 127.0.0.3 a dynamic-looking one (S25R: suspicious, tarpit 5 s at RCPT)."
echo "\$ tcpserver -vRHl0 -x tcp.smtp.cdb 127.0.0.1 $port tarpit-smtpd tarpit-sink Maildir"
TARPIT_CONTROL="$dir/control" TARPIT_GREYLIST_URL="$dir/greylist.sqlite" \
    tcpserver -vRHl0 -x "$dir/tcp.smtp.cdb" 127.0.0.1 "$port" \
    tarpit-smtpd tarpit-sink "$dir/Maildir" 2> "$dir/log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$dir"' EXIT
sleep 0.5
echo
echo "== 2. The clients: a good one delivers at once; a bot from the dynamic name is held in the tarpit"
echo "      and gives up after 2 s, as bots do (the wrapper notices the hang-up at once)."
"$python" scripts/demo_clients.py "$port"
sleep 0.3
echo
echo "== 3. The wrapper's log, one line per event (tarpit_start, then tarpit_lost with the seconds it held):"
grep -E '^tarpit-(smtpd|sink)' "$dir/log"
echo
echo "== 4. The good client's message, as the backend delivered it (byte for byte what was sent):"
for f in "$dir"/Maildir/new/*; do echo "--- $f"; cat "$f"; done
echo
echo "== 5. tarpitctl stats: the give-up table and funnel a postmaster reads from these logs"
tarpitctl stats "$dir/log"
