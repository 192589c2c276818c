"""End to end with the backend the wrapper was written for: tcpserver -> tarpit-smtpd -> qmail-smtpd.

qmail-smtpd is built from the vendored notqmail (tests/qmail_backend.py) and queues
through a stub that keeps each message and its envelope.  "Byte for byte" here:
the queued message is qmail-smtpd's one Received: header followed by exactly the
bytes the client sent, as qmail stores them: CRLF turned into LF (qmail-smtpd.c
`blast`) and dot-stuffing undone (by smtplib and qmail between them).
"""

from __future__ import annotations

import re
import smtplib
import time

from qmail_backend import qmail_smtpd  # noqa: F401  (qmail_smtpd is a fixture)

GOOD, BOT, OTHER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
RULES = f"""
{GOOD}:allow,TCPREMOTEHOST="mail.example.org"
{BOT}:allow,TCPREMOTEHOST="{DYNAMIC}",TARPIT="1",TARPIT_GREYLIST="off"
{OTHER}:allow,TCPREMOTEHOST="mx2.example.org"
"""
HEADERS = (b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: qmail byte test\r\n"
           b"Date: Mon, 2 Feb 2026 10:00:00 +0000\r\nMessage-ID: <qmail-test@example.org>\r\n\r\n")
MESSAGE = (HEADERS + b"line one\r\n.leading dot survives\r\n..two dots\r\n.\tdot tab\r\n"
           b"8bit: \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xff\xfe\x80\r\n" + b"x" * 4000 + b"\r\n"
           b"\r\nlast line without trailing blank\r\n")


def stored(sent: bytes) -> bytes:
    """How qmail-smtpd hands `sent` (CRLF lines) to qmail-queue: with LF line ends."""
    return sent.replace(b"\r\n", b"\n")


def smtp_from(server, src: str, timeout: float = 30) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.port, source_address=(src, 0), timeout=timeout)


def split_received(message: bytes) -> tuple[bytes, bytes]:
    """(qmail-smtpd's Received: header with its continuation lines, the rest)."""
    assert message.startswith(b"Received: "), message[:200]
    end = re.search(rb"\n(?![ \t])", message).end()
    return message[:end], message[end:]


def start(tarpit_server, qmail_smtpd, tmp_path, control_files=None):  # noqa: F811
    queue = tmp_path / "queue"
    server = tarpit_server(RULES, command=["tarpit-smtpd", *qmail_smtpd.command(queue)],
                           control_files=control_files)
    return server, queue


def test_good_client_delivers_byte_for_byte(tarpit_server, qmail_smtpd, tmp_path):  # noqa: F811
    server, queue = start(tarpit_server, qmail_smtpd, tmp_path)
    with smtp_from(server, GOOD) as s:
        code, banner = s.ehlo("mail.example.org")
        assert code == 250 and b"PIPELINING" in banner
        assert s.sendmail("a@example.org", ["bob@example.com", "carol@example.org"], MESSAGE) == {}
    [(sender, rcpts, message)] = qmail_smtpd.queued(queue)
    assert (sender, rcpts) == ("a@example.org", ["bob@example.com", "carol@example.org"])
    received, rest = split_received(message)
    assert rest == stored(MESSAGE)
    assert b"from mail.example.org (HELO mail.example.org) (127.0.0.2)" not in received  # same name: no HELO
    # "by 0": the local name is TCPLOCALHOST, which conftest's `tcpserver -l0` sets to 0
    assert received.startswith(b"Received: from mail.example.org (127.0.0.2)\n  by 0 with SMTP; "), received
    assert [e["class"] for e in server.events("connect")] == ["normal"]


def test_suspicious_client_is_tarpitted_then_delivers(tarpit_server, qmail_smtpd, tmp_path):  # noqa: F811
    server, queue = start(tarpit_server, qmail_smtpd, tmp_path)
    with smtp_from(server, BOT) as s:
        code, features = s.ehlo("bot.example.org")
        assert code == 250 and b"PIPELINING" not in features.upper(), features
        assert s.mail("spam@example.org")[0] == 250
        t = time.monotonic()
        assert s.rcpt("bob@example.com")[0] == 250
        assert time.monotonic() - t >= 0.9, "the RCPT reply waits for the 1 s tarpit"
        assert s.data(MESSAGE)[0] == 250
    [(sender, rcpts, message)] = qmail_smtpd.queued(queue)
    assert (sender, rcpts) == ("spam@example.org", ["bob@example.com"])
    received, rest = split_received(message)
    assert rest == stored(MESSAGE)
    assert f"from {DYNAMIC} (HELO bot.example.org) (127.0.0.3)".encode() in received, received
    assert [e["class"] for e in server.events("connect")] == ["suspicious"]
    [done] = server.events("tarpit_done")
    assert done["stage"] == "rcpt"


def test_rcptusers_refuses_an_unknown_user_before_qmail_sees_it(tarpit_server, qmail_smtpd, tmp_path):  # noqa: F811
    server, queue = start(tarpit_server, qmail_smtpd, tmp_path, control_files={"rcptusers": "bob\n"})
    with smtp_from(server, OTHER) as s:
        s.ehlo("mx2.example.org")
        assert s.mail("a@example.org")[0] == 250
        code, text = s.rcpt("nosuchuser@example.com")
        assert code == 550, (code, text)
        assert s.rcpt("bob@example.com")[0] == 250
        assert s.data(MESSAGE)[0] == 250
    [(sender, rcpts, message)] = qmail_smtpd.queued(queue)
    assert rcpts == ["bob@example.com"]
    assert split_received(message)[1] == stored(MESSAGE)


def test_qmail_refuses_relaying_itself(tarpit_server, qmail_smtpd, tmp_path):  # noqa: F811
    """rcpthosts is in force (no RELAYCLIENT): the backend's own refusal reaches the client."""
    server, queue = start(tarpit_server, qmail_smtpd, tmp_path)
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        s.mail("a@example.org")
        code, text = s.rcpt("someone@elsewhere.example")
        assert code == 553 and b"rcpthosts" in text, (code, text)
    assert qmail_smtpd.queued(queue) == []
