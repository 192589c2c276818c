"""A real qmail-smtpd as a test backend, built from the vendored notqmail tarball.

Public names:
  TARBALL      tests/vendor/notqmail-a7012e4.tar.gz (see tests/vendor/README.md)
  STUB         tests/qmail/qmail-queue-stub, the qmail-queue stand-in
  QmailSmtpd   the built program: `command(queue_dir)` -> argv, `queued(queue_dir)` -> messages
  qmail_smtpd  session-scoped fixture returning a QmailSmtpd; a test module uses it by
               `from qmail_backend import qmail_smtpd` (pytest finds fixtures imported into
               the module's namespace; no pytest_plugins needed)

The fixture extracts the tarball into a temporary directory, points conf-qmail at a
`root` directory there and runs `make qmail-smtpd` (gcc and make, ~10 s, once per
session).  No install step, no system users: qmail-smtpd itself needs neither; it
chdirs to the compiled-in root, reads `control/me` and `control/rcpthosts`
(example.com and example.org) and runs $QMAILQUEUE for each message.  It takes the
client's address from tcpserver's TCPREMOTEIP/TCPREMOTEHOST; RELAYCLIENT is not set,
so rcpthosts applies.  A missing tarball, gcc or make skips the test saying why, and
fails it under TEST_REQUIRE_ALL (the rule of conftest.need).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TARBALL = HERE / "vendor" / "notqmail-a7012e4.tar.gz"
STUB = HERE / "qmail" / "qmail-queue-stub"
ME = "qmail.example.com"
RCPTHOSTS = ("example.com", "example.org")


def _unavailable(reason: str) -> None:
    """Skip (or fail under TEST_REQUIRE_ALL) because `reason`."""
    if os.environ.get("TEST_REQUIRE_ALL"):
        pytest.fail(f"{reason} but TEST_REQUIRE_ALL is set (CI must be able to build qmail-smtpd)")
    pytest.skip(reason)


@dataclass(frozen=True)
class QmailSmtpd:
    """A built qmail-smtpd and its control directory (`root`/control)."""

    binary: Path
    root: Path

    def command(self, queue_dir: Path) -> list[str]:
        """The backend argv: qmail-smtpd queueing through the stub into `queue_dir` (created)."""
        queue_dir.mkdir(parents=True, exist_ok=True)
        return ["env", f"QMAILQUEUE={STUB}", f"QUEUE_DIR={queue_dir}", str(self.binary)]

    @staticmethod
    def queued(queue_dir: Path) -> list[tuple[str, list[str], bytes]]:
        """Every message the stub queued in `queue_dir`, oldest first: (sender, recipients, message).

        The message is what qmail-smtpd handed to qmail-queue: its own Received:
        header, then the client's bytes with CRLF turned into LF and dot-stuffing undone.
        """
        out = []
        files = sorted(p for p in queue_dir.iterdir() if p.name.startswith("msg.")) if queue_dir.is_dir() else []
        for path in files:
            data = path.read_bytes()
            first, _, rest = data.partition(b"\n")
            size = int(first.strip())
            message, envelope = rest[:size], rest[size:]
            fields = envelope.split(b"\0")
            assert fields[0].startswith(b"F"), envelope
            sender = fields[0][1:].decode("latin-1")
            rcpts = [f[1:].decode("latin-1") for f in fields[1:] if f.startswith(b"T")]
            out.append((sender, rcpts, message))
        return out


def build(base: Path) -> QmailSmtpd:
    """Extract TARBALL under `base`, build qmail-smtpd for root `base`/root, write its control files."""
    if not TARBALL.exists():
        _unavailable(f"{TARBALL} is missing (it is committed with the tests; see tests/vendor/README.md)")
    for tool in ("make", "gcc"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} not installed (Debian package build-essential): needed to build qmail-smtpd")
    root = base / "root"
    (root / "control").mkdir(parents=True)
    with tarfile.open(TARBALL) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(base, filter="data")
        else:  # Python before 3.11.4 (Debian 12's 3.11.2) has no extraction filters
            tar.extractall(base)
    src = base / "notqmail-a7012e4"
    (src / "conf-qmail").write_text(f"{root}\n")
    done = subprocess.run(["make", "qmail-smtpd"], cwd=src, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"make qmail-smtpd failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    binary = root / "qmail-smtpd"
    shutil.copy2(src / "qmail-smtpd", binary)
    (root / "control" / "me").write_text(f"{ME}\n")
    (root / "control" / "rcpthosts").write_text("".join(f"{d}\n" for d in RCPTHOSTS))
    return QmailSmtpd(binary, root)


@pytest.fixture(scope="session")
def qmail_smtpd(tmp_path_factory) -> QmailSmtpd:
    """qmail-smtpd built once per session from the vendored notqmail (see the module docstring)."""
    return build(tmp_path_factory.mktemp("qmail"))
