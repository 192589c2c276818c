"""End to end with STARTTLS and AUTH on the fast path: tcpserver -> tarpit-smtpd -> exec `exim4 -bs`.

No control files and a normal client: the wrapper execs exim on the client's
socket, so TLS and AUTH are exim's own (tests/exim/exim-tls.conf.in, fixture in
tests/tls_backend.py).  These tests pin down what the backend does, so the
proxy-path tests (test_tls_proxy.py) can expect the same from the wrapper.

Byte for byte as in test_exim_backend: the delivered file is one Received:
header from exim followed by the bytes the client sent, with LF line ends.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import subprocess
import time

from tls_backend import PASSWORD, USER, exim_tls, exim_tls_server, swaks  # noqa: F401  (fixtures)
from test_exim_backend import GOOD, HEADERS, MESSAGE, assert_exact_delivery, body_of, replies, smtp_from, stored

# What swaks sends with --data: plain ASCII (swaks rewrites line ends), a dot-stuffed line.
SWAKS_MESSAGE = (HEADERS.replace(b"byte test", b"swaks tls").replace(b"byte-test@", b"swaks-tls@")
                 + b"over TLS\r\n.a leading dot\r\nend\r\n")


def tls_context(exim) -> ssl.SSLContext:
    """A client context that verifies exim's self-signed certificate for mx.example.com."""
    return ssl.create_default_context(cafile=str(exim.ca))


def swaks_data(tmp_path, message: bytes) -> str:
    """An --data argument for `message`; swaks adds CRLF before the final dot itself."""
    assert message.endswith(b"\r\n")
    path = tmp_path / "message.eml"
    path.write_bytes(message[:-2])
    return f"@{path}"


def test_swaks_tls_delivers_byte_for_byte(exim_tls_server, exim_tls, tmp_path):
    server = exim_tls_server()
    run = swaks(server, GOOD, "--tls", "--tls-verify", "--tls-ca-path", str(exim_tls.ca),
                "--ehlo", "mail.example.org", "--from", "a@example.org", "--to", "bob@example.com",
                "--data", swaks_data(tmp_path, SWAKS_MESSAGE))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "<-  220 TLS go ahead" in run.stdout
    received = assert_exact_delivery(exim_tls, SWAKS_MESSAGE, GOOD, "mail.example.org")
    assert re.search(rb"with esmtps +\(TLS1\.3\) tls ", received), received
    assert server.events("exec"), "no control files: the fast path"


def test_smtplib_starttls_login_relays_to_an_outside_domain(exim_tls_server, exim_tls):
    server = exim_tls_server()
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        assert s.has_extn("starttls") and s.has_extn("auth")
        code, _ = s.starttls(context=tls_context(exim_tls))
        assert code == 220
        s.ehlo("mail.example.org")
        assert s.sock.version() == "TLSv1.3"
        code, text = s.login(USER, PASSWORD)
        assert code == 235, text
        assert s.sendmail("a@example.org", ["bob@remote.example"], MESSAGE) == {}
    received = assert_exact_delivery(exim_tls, MESSAGE, GOOD, "mail.example.org")
    assert re.search(rb"with esmtpsa +\(TLS1\.3\) tls ", received), received
    assert b"for bob@remote.example;" in received, received
    log = exim_tls.mainlog()
    assert "P=esmtpsa X=TLS1.3:" in log and "A=PLAIN:alice" in log, log
    assert "=> bob <bob@remote.example> R=everything_maildir" in log, log


def test_swaks_tls_auth_login_relays(exim_tls_server, exim_tls, tmp_path):
    server = exim_tls_server()
    run = swaks(server, GOOD, "--tls", "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
                "--ehlo", "mail.example.org", "--from", "a@example.org", "--to", "bob@remote.example",
                "--data", swaks_data(tmp_path, SWAKS_MESSAGE))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "<~  235 Authentication succeeded" in run.stdout
    assert_exact_delivery(exim_tls, SWAKS_MESSAGE, GOOD, "mail.example.org")
    assert "A=LOGIN:alice" in exim_tls.mainlog()


def test_auth_is_offered_and_works_without_tls(exim_tls_server, exim_tls):
    """What the wrapper needs when it terminates TLS: it talks plaintext to the backend."""
    server = exim_tls_server()
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert s.login(USER, PASSWORD)[0] == 235
        assert s.sendmail("a@example.org", ["carol@remote.example"], MESSAGE) == {}
    received = assert_exact_delivery(exim_tls, MESSAGE, GOOD, "mail.example.org")
    assert b"with esmtpa " in received, received


def test_relaying_needs_auth_even_inside_tls_and_a_wrong_password_is_535(exim_tls_server, exim_tls):
    server = exim_tls_server()
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.org")
        s.starttls(context=tls_context(exim_tls))
        s.ehlo("mail.example.org")
        try:
            s.login(USER, "wrong")
            raise AssertionError("a wrong password was accepted")
        except smtplib.SMTPAuthenticationError as e:
            assert e.smtp_code == 535
        s.mail("a@example.org")
        code, text = s.rcpt("bob@remote.example")
        assert code == 550 and b"relay not permitted" in text
        assert s.rcpt("bob@example.com")[0] == 250


def test_plaintext_pipelined_after_starttls_is_not_run_inside_tls(exim_tls_server, exim_tls):
    """The CVE-2011-0411 injection against exim itself: the RSET is thrown away, not answered in TLS."""
    server = exim_tls_server()
    sock = server.connect(GOOD)
    replies(sock, 1)
    sock.sendall(b"EHLO mail.example.org\r\n")
    replies(sock, 1)
    sock.sendall(b"STARTTLS\r\nRSET\r\n")
    [go] = replies(sock, 1)
    assert go.startswith(b"220 ")
    tls = tls_context(exim_tls).wrap_socket(sock, server_hostname="mx.example.com")
    tls.sendall(b"NOOP\r\n")
    time.sleep(0.2)  # an injected RSET's reply would come first, before NOOP's
    assert replies(tls, 1) == [b"250 OK\r\n"], "exactly one reply: the NOOP's"
    tls.sendall(b"QUIT\r\n")
    assert replies(tls, 1)[0].startswith(b"221 ")
    tls.close()


def test_received_header_marks_tls_only_when_used(exim_tls_server, exim_tls):
    server = exim_tls_server()
    with smtp_from(server, GOOD) as s:
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
    [delivered] = exim_tls.messages(1)
    received, rest = body_of(delivered)
    assert rest == stored(MESSAGE)
    assert re.search(rb"with esmtp \(Exim", received), received


def _starttls_go_ahead(send, recv) -> None:
    """Greeting, EHLO (STARTTLS offered), STARTTLS -> 220, over any byte channel."""
    def reply():
        buf = b""
        while not re.search(rb"(?m)^\d{3} .*\r\n", buf):
            chunk = recv(65536)
            assert chunk, buf
            buf += chunk
        return buf
    assert reply().startswith(b"220 ")
    send(b"EHLO mail.example.org\r\n")
    assert b"250-STARTTLS\r\n" in reply()
    send(b"STARTTLS\r\n")
    assert reply().startswith(b"220 ")


def test_exim_bs_does_tls_on_a_socketpair_but_hangs_on_pipes(exim_tls):
    """What a pass-through proxy must know: give `exim -bs` a socket, not pipes.

    GnuTLS does its I/O with recv()/sendmsg(): on pipes they fail with
    ENOTSOCK after exim has already said "220 TLS go ahead", and exim then
    waits for a plaintext line; the client hangs until one side times out.
    """
    argv = [*exim_tls.command(peer=False), "-oMa", GOOD]
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        ours.settimeout(10)
        _starttls_go_ahead(ours.sendall, ours.recv)
        tls = tls_context(exim_tls).wrap_socket(ours, server_hostname="mx.example.com")
        tls.sendall(b"QUIT\r\n")
        assert replies(tls, 1)[0].startswith(b"221 ")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        ours.close()

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        def send(data):
            proc.stdin.write(data)
            proc.stdin.flush()
        _starttls_go_ahead(send, lambda n: os.read(proc.stdout.fileno(), n))
        cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = tls_context(exim_tls).wrap_bio(cin, cout, server_hostname="mx.example.com")
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            send(cout.read())  # the ClientHello
        os.set_blocking(proc.stdout.fileno(), False)
        time.sleep(1.5)
        try:
            answer = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            answer = None
        assert answer is None and proc.poll() is None, "no ServerHello, no close: exim hangs"
    finally:
        proc.kill()
        proc.wait()
