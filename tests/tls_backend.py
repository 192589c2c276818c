"""Test helpers for TLS: certificates made at test time, and exim with STARTTLS and AUTH.

Public names:
  make_cert       a self-signed certificate: (cert.pem, key.pem, combined servercert.pem)
  EximTLS         one test's exim (tests/exim/exim-tls.conf.in) and its certificate files
  exim_tls        fixture: a private exim with STARTTLS and AUTH PLAIN/LOGIN for alice/s3cret
  exim_tls_server fixture: factory for tcpserver + tarpit-smtpd in front of that exim
  swaks           run swaks against a server from a loopback source address
  USER, PASSWORD  the one AUTH user the backend knows

Not a conftest: a test module that wants the fixtures imports them by name
(`from tls_backend import exim_tls, exim_tls_server  # noqa: F401`).

What the exim backend does with TLS, found by trying on Debian's exim 4.96
(GnuTLS build), and why it matters for a wrapper that passes TLS through:
- `exim4 -bs` does STARTTLS on its stdin/stdout when they are sockets: a TCP
  socket from tcpserver (the fast path, exec) or a socketpair (the proxy).
- When stdin/stdout are pipes, exim still advertises STARTTLS and answers
  "220 TLS go ahead", then GnuTLS's recv()/sendmsg() fail with ENOTSOCK; exim
  logs "TLS error ... Error in the pull function" only when the client gives up
  and meanwhile waits for a plaintext line: the client hangs.  A pass-through
  proxy must hand exim a socket, never pipes.
- exim reads the TLS key after giving up root (-C: it runs as Debian-exim),
  so the key must be readable by the Exim user.
- Plaintext pipelined after STARTTLS ("STARTTLS\\r\\nRSET\\r\\n" in one packet) is
  discarded by exim, not run inside TLS.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cmdline, need
from test_exim_backend import EXIM, RULES, Exim, make_exim_root

TEMPLATE = Path(__file__).parent / "exim" / "exim-tls.conf.in"
USER, PASSWORD = "alice", "s3cret"


def make_cert(directory: Path, cn: str = "mx.example.com", days: int = 2) -> tuple[Path, Path, Path]:
    """Make a self-signed RSA certificate for `cn` (and for 127.0.0.1) in `directory`.

    The IP address is in subjectAltName so that clients which check the name
    they connected to (smtplib's starttls, swaks --tls-verify) accept it.

    Returns (cert.pem, key.pem, servercert.pem); the last holds key and
    certificate in one file, like qmail's control/servercert.pem.
    """
    need("openssl")
    cert, key, combined = directory / "cert.pem", directory / "key.pem", directory / "servercert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                    "-days", str(days),
                    "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    combined.write_bytes(key.read_bytes() + cert.read_bytes())
    return cert, key, combined


class EximTLS(Exim):
    """One test's exim with STARTTLS and AUTH; its certificate lives in root/tls/."""

    @property
    def ca(self) -> Path:
        """The self-signed certificate, for clients that verify (it is its own CA)."""
        return self.root / "tls" / "cert.pem"

    @property
    def servercert(self) -> Path:
        """Key and certificate in one PEM, readable by root only: for the wrapper's TARPIT_TLS_CERT."""
        return self.root / "tls" / "servercert.pem"


@pytest.fixture
def exim_tls(tmp_path):
    """A private exim with STARTTLS and AUTH, as the `exim` fixture of test_exim_backend does it.

    Not under tmp_path (mode 0700 root), which the Exim user cannot enter;
    spool, log, Maildir and the TLS key are owned by the Exim user, which
    receives (having given up root because of -C) and delivers.
    """
    if not os.path.exists(EXIM):
        need(EXIM)
    root = make_exim_root("tarpit-exim-tls-", TEMPLATE, subdirs=("spool", "log", "Maildir", "tls"),
                          fill=lambda r: make_cert(r / "tls"))
    try:
        (root / "tls" / "key.pem").chmod(0o600)
        # the wrapper's copy stays root's, as a servercert.pem would be on a real host
        os.chown(root / "tls" / "servercert.pem", 0, 0)
        (root / "tls" / "servercert.pem").chmod(0o600)
        (tmp_path / "exim").symlink_to(root)
        yield EximTLS(root)
    finally:
        _wait_for_exims(root)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_exims(root: Path, grace: float = 2.0) -> None:
    """Wait until no process runs with `root` in its command line; SIGKILL those left after `grace`.

    tcpserver is stopped with SIGTERM to its process group.  An exim caught in
    a TLS handshake (a failed test whose client socket is still open) outlives
    that and, when it finally gives up, logs and makes root/log/ again after
    the directory is gone, leaving it behind in /tmp.  Only processes whose
    command line names this test's private directory are touched.
    """
    def ours() -> list[int]:
        return [int(d) for d in os.listdir("/proc") if d.isdigit() and str(root) in cmdline(int(d))]

    deadline = time.monotonic() + grace
    while (pids := ours()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def exim_tls_server(exim_tls, tarpit_server):
    """Factory: tcpserver + tarpit-smtpd in front of this test's TLS exim, with test_exim_backend.RULES.

    `rules` replaces RULES; `env` and `control_files` go to tarpit_server.
    Asking for exim_tls before tarpit_server stops tcpserver first at teardown.
    """
    def start(control_files: dict[str, str] | None = None, env: dict[str, str] | None = None,
              rules: str = RULES, peer: bool = True):
        return tarpit_server(rules, command=["tarpit-smtpd", *exim_tls.command(peer)], env=env,
                             control_files=control_files)

    return start


def swaks(server, src: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run swaks against `server` from source address `src`; returns the finished process (text)."""
    need("swaks")
    return subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(server.port),
                           "--local-interface", src, *args],
                          capture_output=True, text=True, timeout=timeout)
