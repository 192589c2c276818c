"""Sans-I/O TLS server side for STARTTLS: bytes in, bytes out, over ssl.MemoryBIO.

Public names:
  TLSFailed     the client broke the TLS protocol; `reason` is a short token for the log
  load_context  the server SSLContext for a certificate (and key); ControlError if unusable
  describe      a certificate file's subject and expiry, for `tarpitctl check`
  ServerTLS     one connection's TLS: feed() raw client bytes, handshake(), read()
                plaintext, write() plaintext, send outgoing() raw bytes, close()

ServerTLS never touches a socket or a clock, so the blocking per-connection
driver and an asyncio listener can both use it.  The driver's loop after it
has sent the 220 reply to STARTTLS:

    tls = ServerTLS(load_context(cert, key))   # load_context once per process
    while not tls.handshake():                 # TLSFailed: log tls.reason, close
        send(tls.outgoing()); tls.feed(recv())
    send(tls.outgoing())
    then: tls.feed(recv()); plain = tls.read()      client -> session
          tls.write(reply); send(tls.outgoing())    session -> client
          tls.eof                                   the client closed (TLS or TCP)

Rules a driver must keep:
- Bytes the client sent after the STARTTLS line and before our 220 reply are
  plaintext that must never be fed to ServerTLS or run as commands after the
  handshake (RFC 3207 section 6; the CVE-2011-0411 injection).  Discard them.
- After handshake() returns True, call read() at once: a TLS 1.3 client may
  have sent its first command in the same flight as its Finished message.
- After every feed(), handshake(), read(), write() or close() there may be
  bytes in outgoing(); send them before waiting for the client again.  After
  TLSFailed, outgoing() may still hold an alert for the client: send it, then
  close.  No exception text ever goes to the client.
- After TLSFailed the object stays failed: every later call raises it again.

Import cost: `import ssl` loads OpenSSL (several ms and a few MB per
connection).  Only this module imports ssl; nothing on the path of a session
without a certificate may import libtarpit.tls.  Callers import it lazily,
inside the function that handles STARTTLS with a certificate configured.
"""

from __future__ import annotations

import re
import ssl

from .errors import ControlError

__all__ = ["TLSFailed", "load_context", "describe", "ServerTLS"]

_CHUNK = 16384
# OpenSSL's reason names are fixed upper-case identifiers; anything else becomes "error"
_TOKEN = re.compile(r"[a-z0-9_]{1,40}")


class TLSFailed(Exception):
    """The client broke the TLS protocol or sent no TLS at all.

    `reason` is a short lower-case token fit for a log field, taken from
    OpenSSL's reason name (e.g. "wrong_version_number", "unsupported_protocol",
    "no_shared_cipher", "http_request") or one of ours ("eof" during the handshake).
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _reason(err: ssl.SSLError) -> str:
    """A log token for `err`: OpenSSL's reason name, lower-cased, or the exception kind."""
    if isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "eof"
    token = (err.reason or "").lower()
    return token if _TOKEN.fullmatch(token) else "error"


class _EncryptedKey(Exception):
    """Raised by _no_password: the key file wants a passphrase."""


def _no_password() -> str:
    """Refuse an encrypted key rather than let OpenSSL prompt on a terminal."""
    raise _EncryptedKey


def _readable(path: str) -> None:
    """Raise ControlError naming `path` unless it can be opened for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ControlError(path, e.strerror or "cannot be read") from None


def _decode(cert: str) -> dict:
    """The first certificate in PEM file `cert`, as the ssl module decodes it; ControlError if none."""
    _readable(cert)
    try:
        return ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except (ssl.SSLError, ValueError):
        raise ControlError(cert, "no PEM certificate in the file") from None


def load_context(cert: str, key: str | None = None) -> ssl.SSLContext:
    """Return a server SSLContext with `cert` (PEM: certificate, chain, and key unless `key` is given).

    TLS 1.2 is the minimum; ciphers are the system's defaults (Debian's
    OpenSSL configuration); no client certificates are asked for; client
    renegotiation is refused; a TCP EOF without close_notify ends the stream
    cleanly (ServerTLS.eof) and leaves our side able to write.  Raises
    ControlError naming the file at fault and why: unreadable, no certificate,
    no key, encrypted key (never a passphrase prompt), or a key that does not
    match the certificate.  Load it once per process, at the first STARTTLS.
    """
    _decode(cert)
    if key is not None:
        _readable(key)
    keyfile = key or cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # A TCP FIN without close_notify (common after QUIT) is an end of stream, not a
    # fatal error: without this OpenSSL 3 fails the connection and the replies a
    # half-closed client is still owed (221 after "QUIT" + shutdown) could not be sent.
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise ControlError(keyfile, "the private key is encrypted (a server key must not be)") from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ControlError(keyfile, "the private key does not match the certificate") from None
        raise ControlError(keyfile, "no usable PEM private key in the file") from None
    return ctx


def describe(cert: str) -> tuple[str, float]:
    """Return (subject, notAfter as epoch seconds) of the first certificate in PEM file `cert`.

    The subject is one line, "CN=mx.example.com, O=Example", non-printable
    characters as "?".  Raises ControlError if the file is unreadable or holds
    no certificate.
    """
    info = _decode(cert)
    parts = [f"{_SHORT.get(k, k)}={v}" for rdn in info.get("subject", ()) for k, v in rdn]
    subject = "".join(c if c.isprintable() else "?" for c in ", ".join(parts))
    try:
        expires = float(ssl.cert_time_to_seconds(info["notAfter"]))
    except (KeyError, ValueError):
        raise ControlError(cert, "the certificate has no readable notAfter date") from None
    return subject, expires


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
          "emailAddress": "emailAddress"}


class ServerTLS:
    """The server side of one TLS connection, over memory buffers.  See the module docstring.

    Attributes:
      established  the handshake is complete
      eof          the client ended the stream (close_notify or a bare TCP EOF);
                   read() returns b"" from now on
      failed       None, or the reason token of the TLSFailed raised
    """

    def __init__(self, context: ssl.SSLContext):
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self.established = False
        self.eof = False
        self.failed: str | None = None

    def feed(self, raw: bytes) -> None:
        """Take bytes read from the client socket; b"" means the client closed its side."""
        if self._in.eof:
            return
        if raw:
            self._in.write(raw)
        else:
            self._in.write_eof()

    def handshake(self) -> bool:
        """Advance the handshake; return True once it is complete.  Raises TLSFailed."""
        self._check()
        if self.established:
            return True
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            if self._in.eof:
                self._fail("eof")
            return False
        except ssl.SSLError as e:
            self._fail(_reason(e))
        self.established = True
        return True

    def read(self) -> bytes:
        """Return the plaintext that can be decrypted now (b"" if none).  Raises TLSFailed.

        Sets `eof` when the client sent close_notify or its TCP stream ended.
        """
        self._check()
        if not self.established:
            raise RuntimeError("ServerTLS.read before the handshake is complete")
        chunks = []
        while not self.eof:
            try:
                chunk = self._tls.read(_CHUNK)
            except ssl.SSLWantReadError:
                if self._in.eof:  # TCP EOF without close_notify: common after QUIT, not an attack
                    self.eof = True
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True
                break
            except ssl.SSLError as e:
                self._fail(_reason(e))
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, plaintext: bytes) -> None:
        """Encrypt `plaintext` for the client; fetch the records with outgoing().  Raises TLSFailed."""
        self._check()
        if not self.established:
            raise RuntimeError("ServerTLS.write before the handshake is complete")
        view = memoryview(plaintext)
        while view:
            try:
                n = self._tls.write(view)
            except ssl.SSLError as e:  # memory BIOs never want I/O for a write
                self._fail(_reason(e))
            view = view[n:]

    def outgoing(self) -> bytes:
        """Return (and forget) the raw bytes to send to the client now; b"" if none."""
        return self._out.read()

    def close(self) -> None:
        """Put our close_notify into outgoing(); we do not wait for the client's."""
        if self.failed is not None or not self.established:
            return
        try:
            self._tls.unwrap()
        except ssl.SSLError:  # SSLWantReadError: ours is sent, theirs not yet come; or peer gone
            pass

    def info(self) -> tuple[str, str]:
        """Return (protocol version, cipher name) of the established connection, for the log."""
        if not self.established:
            return "", ""
        cipher = self._tls.cipher()
        return self._tls.version() or "", cipher[0] if cipher else ""

    def _check(self) -> None:
        if self.failed is not None:
            raise TLSFailed(self.failed)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        raise TLSFailed(reason) from None
