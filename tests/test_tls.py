"""libtarpit.tls against a real client: Python's ssl over a socketpair, the test as the driver.

The client runs in a thread on one end of a socketpair with an ordinary
SSLSocket; the test holds the other end and pumps bytes between it and a
ServerTLS, as the wrapper's driver will.  Certificates are made at test time
with `openssl req` (2 days, CN=mx.example.com).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from libtarpit.errors import ControlError
from libtarpit.tls import ServerTLS, TLSFailed, describe, load_context
from tls_backend import make_cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def context(certs):
    return load_context(str(certs[2]))


class Client(threading.Thread):
    """A TLS client in a thread: runs `script(sslsock)`; keeps its result or exception."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, script):
        super().__init__(daemon=True)
        self.sock, self.ctx, self.script = sock, ctx, script
        self.result = self.error = None

    def run(self):
        try:
            with self.ctx.wrap_socket(self.sock, server_hostname="mx.example.com") as s:
                self.result = self.script(s)
        except Exception as e:  # noqa: BLE001  (handed to the test thread)
            self.error = e

    def outcome(self):
        self.join(10)
        assert not self.is_alive(), "client thread hung"
        return self.result, self.error


def client_context(certs) -> ssl.SSLContext:
    """A verifying client context that trusts our self-signed certificate."""
    return ssl.create_default_context(cafile=str(certs[0]))


def pump(tls: ServerTLS, sock: socket.socket) -> None:
    """Send what the ServerTLS has for the client."""
    out = tls.outgoing()
    if out:
        sock.sendall(out)


def recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def server_handshake(tls: ServerTLS, sock: socket.socket) -> None:
    """The driver's handshake loop; TLSFailed propagates after the alert is sent."""
    try:
        while not tls.handshake():
            pump(tls, sock)
            tls.feed(recv(sock))
    finally:
        pump(tls, sock)


def server_read_until(tls: ServerTLS, sock: socket.socket, end: bytes) -> bytes:
    """Read plaintext until it ends with `end` or the client ends the stream."""
    got = tls.read()
    while not got.endswith(end) and not tls.eof:
        tls.feed(recv(sock))
        got += tls.read()
        pump(tls, sock)
    return got


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("layout", ["combined", "separate"])
def test_handshake_data_both_ways_and_client_close(certs, pair, layout):
    cert, key, combined = certs
    ctx = load_context(str(combined)) if layout == "combined" else load_context(str(cert), str(key))
    client_sock, server_sock = pair
    big = b"x" * 100_000 + b"\r\n"  # several TLS records each way

    def script(s: ssl.SSLSocket):
        s.sendall(b"EHLO client.example.org\r\n")
        reply = b""
        while not reply.endswith(b"250 OK\r\n"):
            reply += s.recv(65536)
        s.sendall(big)
        back = b""
        while len(back) < len(big):
            back += s.recv(65536)
        version = s.version()
        s.unwrap()  # close_notify, then wait for the server's
        return reply, back, version

    client = Client(client_sock, client_context(certs), script)
    client.start()
    tls = ServerTLS(ctx)
    server_handshake(tls, server_sock)
    assert tls.established
    assert server_read_until(tls, server_sock, b"\r\n") == b"EHLO client.example.org\r\n"
    tls.write(b"250-mx.example.com\r\n250 OK\r\n")
    pump(tls, server_sock)
    assert server_read_until(tls, server_sock, b"\r\n") == big
    tls.write(big)
    pump(tls, server_sock)
    assert server_read_until(tls, server_sock, b"never") == b""
    assert tls.eof, "the client's close_notify ends the stream"
    tls.close()
    pump(tls, server_sock)
    (reply, back, version), error = client.outcome()
    assert error is None, error
    assert reply == b"250-mx.example.com\r\n250 OK\r\n" and back == big
    assert version in ("TLSv1.3", "TLSv1.2")
    assert tls.info()[0] == version and tls.info()[1]


def test_first_command_in_the_handshake_flight_is_read_after_handshake(context, certs, pair):
    """TLS 1.3: the client is done first and may send Finished and EHLO in one go."""
    client_sock, server_sock = pair
    sent = threading.Event()

    def script(s):
        s.sendall(b"EHLO early.example.org\r\n")
        sent.set()
        return s.recv(100)

    client = Client(client_sock, client_context(certs), script)
    client.start()
    tls = ServerTLS(context)
    tls.feed(recv(server_sock))  # ClientHello
    assert tls.handshake() is False
    pump(tls, server_sock)
    assert sent.wait(10)
    time.sleep(0.05)
    tls.feed(recv(server_sock))  # Finished + the first application record
    assert tls.handshake() is True
    assert tls.read() == b"EHLO early.example.org\r\n"
    tls.write(b"250 hi\r\n")
    pump(tls, server_sock)
    result, error = client.outcome()
    assert error is None and result == b"250 hi\r\n"


def test_client_eof_without_close_notify_still_gets_its_replies(context, certs, pair):
    """ "QUIT" then a bare TCP half-close (no close_notify): eof, not a failure, and the 221 still goes out."""
    client_sock, server_sock = pair

    def script(s):
        s.sendall(b"QUIT\r\n")
        raw = socket.socket(fileno=os.dup(s.fileno()))
        raw.shutdown(socket.SHUT_WR)
        raw.close()
        return s.recv(100), s.recv(100)

    client = Client(client_sock, client_context(certs), script)
    client.start()
    tls = ServerTLS(context)
    server_handshake(tls, server_sock)
    assert server_read_until(tls, server_sock, b"never") == b"QUIT\r\n"
    assert tls.eof and tls.failed is None
    assert tls.outgoing() == b"", "no alert for a bare EOF"
    tls.write(b"221 bye\r\n")
    tls.close()
    pump(tls, server_sock)
    result, error = client.outcome()
    assert error is None and result == (b"221 bye\r\n", b""), (result, error)


def test_client_close_notify_still_gets_its_replies(context, certs):
    """TLS 1.3 half-close: after the client's close_notify our side can still write.

    The client here is an SSLObject over memory buffers (an SSLSocket cannot
    read after unwrap()), shuttled by hand: no sockets at all.
    """
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(certs).wrap_bio(cin, cout, server_hostname="mx.example.com")
    tls = ServerTLS(context)

    def shuttle():
        raw = cout.read()
        if raw:  # b"" would mean EOF
            tls.feed(raw)
        cin.write(tls.outgoing())

    def client_handshake() -> bool:
        try:
            client.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    for _ in range(3):  # ClientHello; server flight; Finished
        client_done = client_handshake()
        shuttle()
        tls.handshake()
        shuttle()
    assert client_done and tls.established
    client.write(b"QUIT\r\n")
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()  # close_notify out; waits for ours
    shuttle()
    assert tls.read() == b"QUIT\r\n" and tls.eof and tls.failed is None
    tls.write(b"221 bye\r\n")
    tls.close()
    shuttle()
    assert client.read(100) == b"221 bye\r\n"
    with pytest.raises(ssl.SSLZeroReturnError):
        client.read(100)


def test_plaintext_client_fails_the_handshake_with_a_token(context, pair):
    client_sock, server_sock = pair
    client_sock.sendall(b"EHLO plain.example.org\r\nMAIL FROM:<a@example.org>\r\n")
    tls = ServerTLS(context)
    tls.feed(recv(server_sock))
    with pytest.raises(TLSFailed) as info:
        tls.handshake()
    assert info.value.reason == "wrong_version_number"
    assert tls.failed == "wrong_version_number"
    alert = tls.outgoing()
    assert b"EHLO" not in alert and b"wrong" not in alert, "no exception text to the client"
    with pytest.raises(TLSFailed):  # failed stays failed
        tls.handshake()
    with pytest.raises(TLSFailed):
        tls.read()


def test_http_request_instead_of_tls(context):
    tls = ServerTLS(context)
    tls.feed(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(TLSFailed) as info:
        tls.handshake()
    assert info.value.reason == "http_request"


def test_eof_during_handshake(context):
    tls = ServerTLS(context)
    assert tls.handshake() is False
    tls.feed(b"")
    with pytest.raises(TLSFailed) as info:
        tls.handshake()
    assert info.value.reason == "eof"


def test_tls_1_1_client_is_refused(context, certs, pair):
    client_sock, server_sock = pair
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 will not even offer TLS 1.1
    with pytest.warns(DeprecationWarning):  # as it should be
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    client = Client(client_sock, ctx, lambda s: s.version())
    client.start()
    tls = ServerTLS(context)
    with pytest.raises(TLSFailed) as info:
        server_handshake(tls, server_sock)
    assert info.value.reason == "unsupported_protocol"
    result, error = client.outcome()
    assert isinstance(error, ssl.SSLError), (result, error)


def test_tls_1_2_client_is_accepted(context, certs, pair):
    client_sock, server_sock = pair
    ctx = client_context(certs)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client = Client(client_sock, ctx, lambda s: s.version())
    client.start()
    tls = ServerTLS(context)
    server_handshake(tls, server_sock)
    assert tls.info()[0] == "TLSv1.2"
    result, error = client.outcome()
    assert error is None and result == "TLSv1.2"


def test_server_close_sends_close_notify(context, certs, pair):
    client_sock, server_sock = pair
    client = Client(client_sock, client_context(certs), lambda s: s.recv(100))
    client.start()
    tls = ServerTLS(context)
    server_handshake(tls, server_sock)
    tls.close()
    pump(tls, server_sock)
    result, error = client.outcome()
    assert error is None and result == b"", "the client sees a clean TLS end"


def test_write_before_handshake_is_our_bug(context):
    tls = ServerTLS(context)
    with pytest.raises(RuntimeError):
        tls.write(b"220 ready\r\n")
    with pytest.raises(RuntimeError):
        tls.read()


# --- load_context and describe ---------------------------------------------


def test_broken_cert_files_name_the_path_and_the_reason(certs, tmp_path):
    cert, key, combined = certs
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    missing = tmp_path / "missing.pem"
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(["openssl", "genrsa", "-aes128", "-passout", "pass:x", "-out", str(encrypted), "2048"],
                   check=True, capture_output=True)
    cases = [
        ((str(garbage),), garbage, "no PEM certificate"),
        ((str(missing),), missing, "No such file"),
        ((str(key),), key, "no PEM certificate"),              # a key where the certificate should be
        ((str(cert),), cert, "no usable PEM private key"),     # a certificate without its key
        ((str(cert), str(other)), other, "does not match"),
        ((str(cert), str(encrypted)), encrypted, "encrypted"),  # no passphrase prompt on a terminal
        ((str(cert), str(missing)), missing, "No such file"),
    ]
    for args, path, reason in cases:
        with pytest.raises(ControlError) as info:
            load_context(*args)
        assert info.value.path == str(path) and reason in info.value.reason, (args, str(info.value))


def test_a_directory_is_a_control_error(tmp_path):
    with pytest.raises(ControlError, match="Is a directory") as info:
        load_context(str(tmp_path))
    assert info.value.path == str(tmp_path)


def test_context_settings(context):
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE, "no client certificates asked for"
    assert context.options & ssl.OP_NO_RENEGOTIATION


@pytest.mark.parametrize("which", [0, 2])
def test_describe_gives_cn_and_expiry(certs, which):
    subject, expires = describe(str(certs[which]))
    assert subject == "CN=mx.example.com"
    assert abs(expires - (time.time() + 2 * 86400)) < 600


def test_describe_the_leaf_of_a_chain(tmp_path, certs):
    leaf_dir, ca_dir = tmp_path / "leaf", tmp_path / "ca"
    leaf_dir.mkdir()
    ca_dir.mkdir()
    _, _, leaf = make_cert(leaf_dir, cn="leaf.example.com", days=30)
    ca_cert = make_cert(ca_dir, cn="Other CA", days=300)[0]
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.read_bytes() + ca_cert.read_bytes())
    subject, expires = describe(str(chain))
    assert subject == "CN=leaf.example.com" and expires - time.time() < 31 * 86400


def test_describe_broken_file(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("hello\n")
    with pytest.raises(ControlError) as info:
        describe(str(bad))
    assert info.value.path == str(bad)
    with pytest.raises(ControlError, match="No such file"):
        describe(str(tmp_path / "nope.pem"))


def test_plain_sessions_do_not_import_ssl():
    """The per-connection wrapper must not pay for OpenSSL unless a client says STARTTLS with a cert set."""
    code = ("import sys, libtarpit.session, libtarpit.sleep, libtarpit.config, wrappers.tarpit_smtpd;"
            "print('ssl' in sys.modules, '_ssl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
