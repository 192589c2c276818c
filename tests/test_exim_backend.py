"""End to end with a second real backend: tcpserver -> tarpit-smtpd -> `exim4 -bs`.

exim runs as `exim4 -C CONF -odi -bs -oMa $TCPREMOTEIP -oMs $TCPREMOTEHOST` with
the config tests/exim/exim.conf.in, made per test in its own directory (see the
`exim` fixture for why that directory is not pytest's tmp_path).  It accepts
mail for any local part in example.com and delivers it, before the SMTP
session goes on (-odi), into one Maildir.

What "byte for byte" means here: exim stores a message in Maildir with LF line
ends and prepends its own Received: header; the tests build messages that
already carry every header exim would otherwise add (From, Date, Message-ID),
so the delivered file must be exactly one Received: header followed by the
bytes the client sent with CRLF turned into LF (and, for DATA, dot-stuffing
undone, which smtplib and exim do between them).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import children_of, cmdline, need, recv_reply

EXIM = "/usr/sbin/exim4"
TEMPLATE = Path(__file__).parent / "exim" / "exim.conf.in"

GOOD, BOT, PIPER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
RULES = f"""
{GOOD}:allow,TCPREMOTEHOST="mail.example.org"
{BOT}:allow,TCPREMOTEHOST="{DYNAMIC}",TARPIT="1",TARPIT_GREYLIST="off"
{PIPER}:allow,TCPREMOTEHOST="mx2.example.org"
"""
# A control file that none of our clients' HELO names match: its presence alone
# makes a normal client take the proxy path (a per-command check applies).
PROXY = {"badheloarg": "localhost\n"}

HEADERS = (b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: exim byte test\r\n"
           b"Date: Mon, 2 Feb 2026 10:00:00 +0000\r\nMessage-ID: <byte-test@example.org>\r\n\r\n")
# dots at line starts, 8-bit bytes (UTF-8 and not), a 4000-byte line (past RFC 5322's 998:
# the wrapper must not apply its command-line limit inside DATA)
MESSAGE = (HEADERS + b"line one\r\n.leading dot survives\r\n..two dots\r\n.\tdot tab\r\n"
           b"8bit: \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xff\xfe\x80\r\n" + b"x" * 4000 + b"\r\n"
           b"\r\nlast line without trailing blank\r\n")


@dataclass
class Exim:
    """One test's exim: its config, spool, logs and Maildir under `root`."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "exim.conf"

    def command(self, peer: bool = True) -> list[str]:
        """The backend argv; with `peer`, tell exim who the client is, from tcpserver's environment."""
        if not peer:
            return [EXIM, "-C", str(self.config), "-odi", "-bs"]
        script = 'exec "$0" -C "$1" -odi -bs -oMa "$TCPREMOTEIP" -oMs "${TCPREMOTEHOST:-unknown}"'
        return ["sh", "-c", script, EXIM, str(self.config)]

    def messages(self, count: int = 1, timeout: float = 15.0) -> list[bytes]:
        """The delivered messages, oldest first, once there are at least `count` (or at the timeout)."""
        new = self.root / "Maildir" / "new"
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns) if new.is_dir() else []
            if len(files) >= count or time.monotonic() > deadline:
                return [p.read_bytes() for p in files]
            time.sleep(0.05)

    def mainlog(self) -> str:
        path = self.root / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""


def make_exim_root(prefix: str, template: Path = TEMPLATE, head: str = "", subdirs=("spool", "log", "Maildir"),
                   fill=None) -> Path:
    """A new directory with exim.conf from `template` (after `head`) and `subdirs` owned by the Exim user.

    Not under tmp_path: pytest's base directory is mode 0700 root, and exim does
    its reception and (having given up root because of -C) its delivery as the
    Exim user, which must reach the config, spool and Maildir.  `fill(root)` runs
    after the subdirectories exist and before they are handed over.  The caller
    removes the directory.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    (root / "exim.conf").write_text(head + template.read_text().replace("@ROOT@", str(root)))
    (root / "exim.conf").chmod(0o644)
    dirs = [root / sub for sub in subdirs]
    for d in dirs:
        d.mkdir()
    if fill is not None:
        fill(root)
    out = subprocess.run([EXIM, "-C", str(root / "exim.conf"), "-bP", "exim_user"],
                         capture_output=True, text=True, timeout=30)
    m = re.search(r"exim_user = (\S+)", out.stdout)
    assert m, f"exim cannot read its test config: {out.stdout}{out.stderr}"
    user = pwd.getpwnam(m.group(1))
    for d in dirs:  # with whatever exim -bP made in them as root
        for path in [d, *d.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
    return root


@pytest.fixture
def exim(tmp_path):
    """A private exim setup; no system configuration beyond the installed package.

    Not under tmp_path: pytest's base directory is mode 0700 root, and exim does
    its reception and (having given up root because of -C) its delivery as the
    Exim user, which must reach the config, spool and Maildir.
    """
    if not os.path.exists(EXIM):
        need(EXIM)  # skips with the package name, or fails under TEST_REQUIRE_ALL
    root = make_exim_root("tarpit-exim-")
    try:
        (tmp_path / "exim").symlink_to(root)
        yield Exim(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def exim_server(exim, tarpit_server):
    """Factory: tcpserver + tarpit-smtpd in front of this test's exim, with RULES.

    Asking for `exim` before `tarpit_server` makes pytest stop tcpserver (and
    every exim under it) before the exim directory is removed.
    """
    def start(control_files: dict[str, str] | None = None, peer: bool = True):
        return tarpit_server(RULES, command=["tarpit-smtpd", *exim.command(peer)], control_files=control_files)

    return start


def body_of(delivered: bytes) -> tuple[bytes, bytes]:
    """Split a delivered file into (exim's Received: header, the rest)."""
    assert delivered.startswith(b"Received: "), delivered[:200]
    end = re.search(rb"\n(?![ \t])", delivered).end()
    return delivered[:end], delivered[end:]


def stored(sent: bytes) -> bytes:
    """How exim writes `sent` (CRLF lines) into a Maildir file: with LF line ends."""
    return sent.replace(b"\r\n", b"\n")


def smtp_from(server, src: str, timeout: float = 30) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.port, source_address=(src, 0), timeout=timeout)


def replies(sock: socket.socket, count: int) -> list[bytes]:
    """Read `count` complete replies; each is returned as its raw bytes."""
    out, buf = [], b""
    while len(out) < count:
        m = re.match(rb"(?:\d{3}-[^\n]*\n)*\d{3}(?: [^\n]*)?\r?\n", buf)
        if m:
            out.append(m.group(0))
            buf = buf[m.end():]
            continue
        chunk = sock.recv(65536)
        assert chunk, f"server closed after {out!r} + {buf!r}"
        buf += chunk
    assert buf == b"", f"unexpected extra reply bytes {buf!r}"
    return out


def assert_exact_delivery(exim: Exim, sent: bytes, ip: str, host: str) -> bytes:
    """The one delivered message is exim's Received: header + `sent` as stored; return the header."""
    [delivered] = exim.messages(1)
    received, rest = body_of(delivered)
    assert rest == stored(sent)
    assert f"from {host}".encode() in received and f"[{ip}]".encode() in received, received
    return received


def test_proxy_path_delivers_to_exim_byte_for_byte(exim_server, exim):
    server = exim_server(PROXY)
    with smtp_from(server, GOOD) as s:
        code, features = s.ehlo("mail.example.org")
        assert code == 250 and b"Exim" not in features
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
    assert_exact_delivery(exim, MESSAGE, GOOD, "mail.example.org")
    assert [e["class"] for e in server.events("connect")] == ["normal"]
    assert not server.events("exec"), "a badheloarg list puts a normal client on the proxy path"
    assert "=> bob <bob@example.com> R=local_maildir T=maildir" in exim.mainlog()


def test_fast_path_execs_exim_which_delivers(exim_server, exim):
    server = exim_server()
    with smtp_from(server, GOOD) as s:
        assert s.sendmail("a@example.org", ["bob@example.com", "carol@example.com"], MESSAGE) == {}
    copies = exim.messages(2)
    assert len(copies) == 2, "one Maildir file per recipient"
    for delivered in copies:
        received, rest = body_of(delivered)
        assert rest == stored(MESSAGE)
        assert b"from mail.example.org" in received and b"[127.0.0.2]" in received, received
    assert server.events("exec"), "a normal client with no lists takes the exec fast path"
    log = exim.mainlog()
    assert "=> bob <bob@example.com>" in log and "=> carol <carol@example.com>" in log


def test_fast_path_leaves_exim_alone_on_the_socket(exim_server, exim):
    server = exim_server()
    sock = server.connect(GOOD)
    assert recv_reply(sock).startswith(b"220 mx.example.com ESMTP Exim")
    pid = int(server.wait_log(r"tcpserver: pid (\d+) from 127[.]0[.]0[.]2\n").group(1))
    line = cmdline(pid)
    assert "exim4" in line and "tarpit-smtpd" not in line, line
    assert not [c for c in children_of(pid) if "tarpit-smtpd" in cmdline(c)]
    sock.sendall(b"QUIT\r\n")
    assert recv_reply(sock).startswith(b"221")
    sock.close()


def test_suspicious_client_loses_pipelining_and_delivers_after_the_tarpit(exim_server, exim):
    server = exim_server(PROXY)
    with smtp_from(server, BOT) as s:
        code, features = s.ehlo("bot.example.org")
        assert code == 250
        assert b"PIPELINING" not in features.upper(), features
        assert b"CHUNKING" in features, "only PIPELINING is hidden"
        s.mail("spam@example.org")
        t = time.monotonic()
        assert s.rcpt("bob@example.com")[0] == 250
        assert time.monotonic() - t >= 0.9, "the RCPT reply waits for the 1 s tarpit"
        code, _ = s.data(MESSAGE)
        assert code == 250
    assert_exact_delivery(exim, MESSAGE, BOT, DYNAMIC)
    assert [e["class"] for e in server.events("connect")] == ["suspicious"]
    [done] = server.events("tarpit_done")
    assert done["stage"] == "rcpt"


def test_normal_proxied_client_sees_exims_pipelining(exim_server, exim):
    server = exim_server(PROXY)
    with smtp_from(server, GOOD) as s:
        code, features = s.ehlo("mail.example.org")
    lines = features.split(b"\n")
    assert code == 250 and b"PIPELINING" in lines and b"CHUNKING" in lines, features
    assert not server.events("exec")


def test_suspicious_client_is_not_offered_pipeconnect_either(exim_server, exim):
    server = exim_server(PROXY)
    with smtp_from(server, BOT) as s:
        code, features = s.ehlo("bot.example.org")
    assert code == 250 and b"PIPELINING" not in features
    assert b"PIPECONNECT" not in features, features


def test_pipelined_commands_get_replies_in_order_and_the_message_arrives(exim_server, exim):
    server = exim_server(PROXY)
    sock = server.connect(PIPER)
    assert replies(sock, 1)[0].startswith(b"220 ")
    sock.sendall(b"EHLO mx2.example.org\r\n")
    assert b"250-PIPELINING\r\n" in replies(sock, 1)[0]
    # the refused relay recipient in the middle makes the order of the replies visible
    sock.sendall(b"MAIL FROM:<p@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
                 b"RCPT TO:<someone@elsewhere.example>\r\nDATA\r\n")
    got = replies(sock, 4)
    assert [r[:4] for r in got] == [b"250 ", b"250 ", b"550 ", b"354 "], got
    assert b"relay not permitted" in got[2]
    stuffed = re.sub(rb"(?m)^\.", b"..", MESSAGE)
    sock.sendall(stuffed + b".\r\nQUIT\r\n")
    final, bye = replies(sock, 2)
    assert final.startswith(b"250 OK id=") and bye.startswith(b"221 "), (final, bye)
    sock.close()
    received = assert_exact_delivery(exim, MESSAGE, PIPER, "mx2.example.org")
    assert b"for bob@example.com;" in received
    assert not server.events("exec")


def test_bdat_chunks_pass_the_proxy_byte_for_byte(exim_server, exim):
    server = exim_server(PROXY)
    # no dot-stuffing in BDAT: ".\r\n" and "QUIT" lines are message text, and the
    # chunk boundaries cut through a CRLF and through a multi-byte character
    message = (HEADERS.replace(b"byte test", b"bdat test") + b"first\r\n.\r\n..\r\nQUIT\r\n"
               b"RSET\r\n8bit \xe6\x97\xa5\xe6\x9c\xac\r\n" + b"y" * 3000 + b"\r\nend\r\n")
    cut1 = message.index(b"\r\n.\r\n") + 1
    cut2 = message.index(b"\xe6\x9c\xac") + 1
    chunks = [message[:cut1], message[cut1:cut2], message[cut2:]]
    sock = server.connect(GOOD)
    replies(sock, 1)
    sock.sendall(b"EHLO mail.example.org\r\n")
    assert b"250-CHUNKING\r\n" in replies(sock, 1)[0]
    sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n")
    assert [r[:3] for r in replies(sock, 2)] == [b"250", b"250"]
    for i, chunk in enumerate(chunks):
        last = b" LAST" if i == len(chunks) - 1 else b""
        sock.sendall(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
        [r] = replies(sock, 1)
        assert r.startswith(b"250"), (i, r)
    assert b"OK id=" in r, "the LAST chunk's reply is the queue id"
    sock.sendall(b"QUIT\r\n")
    assert replies(sock, 1)[0].startswith(b"221 ")
    sock.close()
    assert_exact_delivery(exim, message, GOOD, "mail.example.org")
    assert not server.events("exec")


def test_pipelined_bdat_then_data_in_one_session(exim_server, exim):
    server = exim_server(PROXY)
    first = HEADERS.replace(b"byte test", b"one") + b"chunked\r\n.\r\n"
    second = MESSAGE.replace(b"byte test", b"two").replace(b"byte-test@", b"two@")
    sock = server.connect(PIPER)
    replies(sock, 1)
    sock.sendall(b"EHLO mx2.example.org\r\n")
    replies(sock, 1)
    sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
                 b"BDAT 0\r\nBDAT %d LAST\r\n" % len(first) + first +
                 b"MAIL FROM:<a@example.org>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n")
    got = replies(sock, 7)
    # an empty chunk without LAST is refused here (envelope.bdat_arg: one reading for every backend)
    assert [r[:3] for r in got] == [b"250", b"250", b"501"] + [b"250"] * 3 + [b"354"], got
    sock.sendall(re.sub(rb"(?m)^\.", b"..", second) + b".\r\nQUIT\r\n")
    final, bye = replies(sock, 2)
    assert final.startswith(b"250 ") and bye.startswith(b"221 ")
    sock.close()
    delivered = [body_of(m)[1] for m in exim.messages(2)]
    assert sorted(delivered) == sorted([stored(first), stored(second)])


def test_proxied_exim_without_oma_takes_the_client_for_a_local_user(exim_server, exim):
    """Why the backend command passes -oMa: on the proxy path exim's stdin is a socketpair.

    Exec'd on the fast path, a bare `exim4 -bs` finds the client with
    getpeername() on the TCP socket; behind the proxy it cannot, and records
    the message as local submission by the wrapper's user (P=local-esmtp,
    U=root), as if the client were on the machine.
    """
    server = exim_server(PROXY, peer=False)
    with smtp_from(server, GOOD) as s:
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
    [delivered] = exim.messages(1)
    received, rest = body_of(delivered)
    assert rest == stored(MESSAGE)
    assert b"[127.0.0.2]" not in received and b"with local-esmtp" in received, received
    assert "P=local-esmtp" in exim.mainlog()
