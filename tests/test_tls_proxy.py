"""STARTTLS and AUTH on the proxy path: tcpserver -> tarpit-smtpd (relaying) -> `exim4 -bs`.

A rcptusers list ("bob") puts every client on the proxy path.  Two modes:

- pass-through (no TARPIT_TLS_CERT): the wrapper relays STARTTLS to exim and,
  after exim's 220, becomes a byte pipe; exim does the TLS (it can, because its
  stdin/stdout are a socketpair: see tests/tls_backend.py).
- termination (TARPIT_TLS_CERT set): the wrapper answers STARTTLS itself, does
  the handshake with libtarpit.tls and talks plaintext to exim, so every check
  (rcptusers, tarpit, error limits) keeps working inside TLS.

The backend is tests/exim/exim-tls.conf.in: STARTTLS, AUTH PLAIN/LOGIN for
alice/s3cret (also without TLS), relaying for authenticated clients only.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import time

import pytest

from tls_backend import PASSWORD, USER, exim_tls, exim_tls_server, swaks  # noqa: F401  (fixtures)
from test_exim_backend import BOT, DYNAMIC, GOOD, HEADERS, MESSAGE, assert_exact_delivery, replies, smtp_from

RCPTUSERS = {"rcptusers": "bob\n"}
SWAKS_MESSAGE = (HEADERS.replace(b"byte test", b"proxy tls").replace(b"byte-test@", b"proxy-tls@")
                 + b"through the wrapper\r\n.a leading dot\r\nend\r\n")
PLAIN_TOKEN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


def tls_context(exim) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(exim.ca))


def swaks_data(tmp_path, message: bytes) -> str:
    """An --data argument for `message`; swaks adds the CRLF before the final dot itself."""
    path = tmp_path / "message.eml"
    path.write_bytes(message[:-2])
    return f"@{path}"


def swaks_tls(server, exim, src, tmp_path, *args):
    return swaks(server, src, "--timeout", "15", "--tls", "--tls-verify", "--tls-ca-path", str(exim.ca),
                 "--from", "a@example.org", "--data", swaks_data(tmp_path, SWAKS_MESSAGE), *args)


def events_in_order(server) -> list[str]:
    return [e["event"] for e in server.events()]


@pytest.fixture
def passthrough(exim_tls_server):
    return exim_tls_server(RCPTUSERS)


@pytest.fixture
def terminating(exim_tls_server, exim_tls):
    def start(env: dict[str, str] | None = None):
        return exim_tls_server(RCPTUSERS, env={"TARPIT_TLS_CERT": str(exim_tls.servercert), **(env or {})})

    return start


# --- (a) pass-through -------------------------------------------------------


def test_passthrough_swaks_tls_delivers(passthrough, exim_tls, tmp_path):
    server = passthrough
    run = swaks_tls(server, exim_tls, GOOD, tmp_path, "--ehlo", "mail.example.org", "--to", "bob@example.com")
    assert run.returncode == 0, run.stdout + run.stderr
    received = assert_exact_delivery(exim_tls, SWAKS_MESSAGE, GOOD, "mail.example.org")
    assert b"with esmtps" in received, "exim did the TLS itself"
    assert not server.events("exec"), "rcptusers: the proxy path"
    assert server.events("tls_passthrough")
    server.wait_log(r"event=end\b")
    assert len(server.events("end")) == 1


def test_passthrough_injected_command_is_not_run_inside_tls(passthrough, exim_tls):
    sock = passthrough.connect(GOOD)
    replies(sock, 1)
    sock.sendall(b"EHLO mail.example.org\r\n")
    assert b"STARTTLS" in replies(sock, 1)[0]
    sock.sendall(b"STARTTLS\r\nRSET\r\n")
    assert replies(sock, 1)[0].startswith(b"220 ")
    tls = tls_context(exim_tls).wrap_socket(sock, server_hostname="mx.example.com")
    tls.sendall(b"NOOP\r\n")
    time.sleep(0.3)
    assert replies(tls, 1) == [b"250 OK\r\n"], "one reply, the NOOP's: no RSET inside TLS"
    tls.sendall(b"QUIT\r\n")
    assert replies(tls, 1)[0].startswith(b"221 ")
    tls.close()


# --- (b) termination --------------------------------------------------------


def test_termination_swaks_tls_delivers(terminating, exim_tls, tmp_path):
    server = terminating()
    run = swaks_tls(server, exim_tls, GOOD, tmp_path, "--ehlo", "mail.example.org", "--to", "bob@example.com")
    assert run.returncode == 0, run.stdout + run.stderr
    assert_exact_delivery(exim_tls, SWAKS_MESSAGE, GOOD, "mail.example.org")
    assert not server.events("tls_passthrough")
    server.wait_log(r"event=end\b")
    [end] = server.events("end")
    assert end.get("tls") == "1", end


def test_termination_rcptusers_still_refuses_inside_tls(terminating, exim_tls):
    server = terminating()
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        assert s.starttls(context=tls_context(exim_tls))[0] == 220
        s.ehlo("mail.example.org")
        s.mail("a@example.org")
        code, text = s.rcpt("nobody@example.com")
        assert code == 550 and text.startswith(b"5.1.1"), (code, text)
        assert s.rcpt("bob@example.com")[0] == 250
        code, _ = s.data(MESSAGE)
        assert code == 250
    assert_exact_delivery(exim_tls, MESSAGE, GOOD, "mail.example.org")


def test_termination_suspicious_client_is_tarpitted_inside_tls(terminating, exim_tls):
    server = terminating()
    with smtp_from(server, BOT) as s:
        s.ehlo("bot.example.org")
        assert s.starttls(context=tls_context(exim_tls))[0] == 220
        s.ehlo("bot.example.org")
        s.mail("spam@example.org")
        t = time.monotonic()
        assert s.rcpt("bob@example.com")[0] == 250
        assert time.monotonic() - t >= 0.9, "the RCPT reply waits for the 1 s tarpit, inside TLS"
        assert s.data(MESSAGE)[0] == 250
    assert_exact_delivery(exim_tls, MESSAGE, BOT, DYNAMIC)
    order = events_in_order(server)
    assert "tls" in order and "tarpit_done" in order, order
    assert order.index("tls") < order.index("tarpit_done"), order
    [done] = server.events("tarpit_done")
    assert done["stage"] == "rcpt"


def test_termination_injected_command_is_not_run_inside_tls(terminating, exim_tls):
    server = terminating()
    sock = server.connect(GOOD)
    replies(sock, 1)
    sock.sendall(b"EHLO mail.example.org\r\n")
    assert b"STARTTLS" in replies(sock, 1)[0]
    sock.sendall(b"STARTTLS\r\nRSET\r\n")
    first = sock.recv(65536)
    if first.startswith(b"220 "):
        try:
            tls = tls_context(exim_tls).wrap_socket(sock, server_hostname="mx.example.com")
        except (ssl.SSLError, OSError):
            tls = None  # the wrapper closed instead of going on: also safe
        if tls is not None:
            tls.sendall(b"NOOP\r\n")
            time.sleep(0.3)
            got = tls.recv(65536)
            assert got in (b"250 OK\r\n", b""), f"RSET answered inside TLS? {got!r}"
            if got:
                tls.sendall(b"QUIT\r\n")
                assert replies(tls, 1)[0].startswith(b"221 ")
            tls.close()
    else:
        assert first == b"" or first[:1] in (b"4", b"5"), first
    sock.close()
    server.wait_log(r"event=end\b")
    assert server.events("tls_injection") or any(e.get("reason") for e in server.events("end")), server.log()


def test_termination_authenticated_suspicious_client_is_not_tarpitted(terminating, exim_tls):
    server = terminating()
    with smtp_from(server, BOT) as s:
        s.ehlo("bot.example.org")
        s.starttls(context=tls_context(exim_tls))
        s.ehlo("bot.example.org")
        assert "PLAIN" in s.esmtp_features.get("auth", "").split()
        assert s.login(USER, PASSWORD)[0] == 235
        s.mail("alice@example.org")
        t = time.monotonic()
        assert s.rcpt("bob@remote.example")[0] == 250, "relayed for an authenticated client"
        assert time.monotonic() - t < 0.5, "no tarpit after AUTH"
        assert s.data(MESSAGE)[0] == 250
    assert_exact_delivery(exim_tls, MESSAGE, BOT, DYNAMIC)
    assert not server.events("tarpit_start")
    [auth] = server.events("auth")
    assert auth.get("mech") == "PLAIN" and auth.get("result") == "ok", auth
    log = server.log()
    assert PASSWORD not in log and PLAIN_TOKEN not in log, "no password in the log, plain or base64"
    assert "A=PLAIN:alice" in exim_tls.mainlog()


def test_termination_authenticated_client_relays_past_rcptusers(terminating, exim_tls):
    """rcptusers lists local users; an authenticated client relaying elsewhere is not checked against it."""
    server = terminating()
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        s.starttls(context=tls_context(exim_tls))
        s.ehlo("mail.example.org")
        assert s.login(USER, PASSWORD)[0] == 235
        assert s.sendmail("alice@example.org", ["carol@remote.example"], MESSAGE) == {}
    assert_exact_delivery(exim_tls, MESSAGE, GOOD, "mail.example.org")


def test_termination_password_guessing_ends_with_421(terminating, exim_tls):
    server = terminating({"TARPIT_ERROR_HARD": "3", "TARPIT_ERROR_SLEEP": "0"})
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        s.starttls(context=tls_context(exim_tls))
        s.ehlo("mail.example.org")
        codes = []
        for i in range(6):
            token = base64.b64encode(f"\0{USER}\0guess{i}".encode()).decode()
            try:
                code, _ = s.docmd("AUTH", f"PLAIN {token}")
            except smtplib.SMTPServerDisconnected:
                break
            codes.append(code)
            if code == 421:
                break
    assert codes and codes[-1] == 421, codes
    assert set(codes[:-1]) == {535} and len(codes) <= 4, codes
    log = server.log()
    assert "guess" not in log and not any(
        base64.b64encode(f"\0{USER}\0guess{i}".encode()).decode() in log for i in range(6))


# --- our own certificate broken ----------------------------------------------------------


def test_termination_with_a_broken_certificate_answers_454_and_delivers_in_plaintext(
        exim_tls_server, exim_tls, tmp_path):
    broken = tmp_path / "servercert.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    broken.chmod(0o644)
    server = exim_tls_server(RCPTUSERS, env={"TARPIT_TLS_CERT": str(broken)})
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        assert s.has_extn("starttls"), "the offer stands until a client takes it"
        code, _ = s.docmd("STARTTLS")
        assert code == 454
        s.ehlo("mail.example.org")
        assert not s.has_extn("starttls"), "neither ours nor exim's once ours failed"
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
    server.wait_log(r"event=end\b")
    [err] = [e for e in server.events("error") if e["what"] == "tls"]
    assert str(broken) in err["detail"]
    assert "tls" not in server.events("end")[0], "the session stayed plaintext"
