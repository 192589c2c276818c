"""Shared fixtures: a real tcpserver in front of the wrapper, clients from loopback addresses.

Each client is a different loopback source address (127.0.0.2, .3, ...); a
tcprules CDB made per test gives each its TCPREMOTEHOST and knobs, the way a
postmaster's tcp.smtp does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def need(binary: str) -> str:
    """Return the path of `binary`, or skip the test saying which package provides it."""
    path = shutil.which(binary)
    if path is None:
        packages = {"tcpserver": "ucspi-tcp", "tcprules": "ucspi-tcp", "exim4": "exim4-daemon-light",
                    "redis-server": "redis-server", "swaks": "swaks", "cdb": "tinycdb",
                    "dnsmasq": "dnsmasq-base"}
        if os.environ.get("TARPIT_REQUIRE_ALL"):
            pytest.fail(f"{binary} not installed but TARPIT_REQUIRE_ALL is set (CI installs everything)")
        pytest.skip(f"{binary} not installed (Debian package {packages.get(os.path.basename(binary), binary)}); "
                    "the README test command installs it")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running tcpserver; `log()` is everything it and its children wrote to stderr."""

    port: int
    proc: subprocess.Popen
    logfile: Path
    maildir: Path
    control: Path
    state: Path

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def events(self, event: str | None = None) -> list[dict[str, str]]:
        from libtarpit.log import parse_line

        out = [e for e in map(parse_line, self.log().splitlines()) if e]
        return [e for e in out if event is None or e["event"] == event]

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not in log:\n{self.log()}")

    def messages(self) -> list[bytes]:
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def connect(self, src: str, timeout: float = 10.0) -> socket.socket:
        s = socket.socket()
        s.settimeout(timeout)
        s.bind((src, 0))
        s.connect(("127.0.0.1", self.port))
        return s


@pytest.fixture
def tarpit_server(tmp_path):
    """Factory: start tcpserver with `rules` (tcprules text) running `command`; stopped at teardown."""
    need("tcpserver")
    need("tcprules")
    started: list[subprocess.Popen] = []

    def start(rules: str, command: list[str] | None = None, env: dict[str, str] | None = None,
              control_files: dict[str, str] | None = None) -> Server:
        base = tmp_path / f"server{len(started)}"  # several servers in one test (two MX hosts)
        base.mkdir()
        control = base / "control"
        control.mkdir()
        for name, text in (control_files or {}).items():
            (control / name).write_text(text)
        state = base / "state"
        state.mkdir(exist_ok=True)
        maildir = base / "Maildir"
        rules_txt = base / "rules"
        rules_txt.write_text(rules.strip() + "\n:allow\n")
        with open(rules_txt) as f:
            subprocess.run(["tcprules", str(base / "rules.cdb"), str(base / "rules.tmp")],
                           stdin=f, check=True)
        port = free_port()
        if command is None:
            command = ["tarpit-smtpd", "tarpit-sink", str(maildir)]
        full_env = dict(os.environ, TARPIT_CONTROL=str(control),
                        TARPIT_GREYLIST_URL=str(state / "greylist.sqlite"), TARPIT_STATE_DIR=str(state))
        full_env.pop("TARPIT_CONFIG", None)
        full_env.update(env or {})
        logfile = base / "server.log"
        log = open(logfile, "ab")
        started.append(None)  # reserve the number before starting
        proc = subprocess.Popen(
            ["tcpserver", "-vRHl0", "-x", str(base / "rules.cdb"), "127.0.0.1", str(port), *command],
            stdout=log, stderr=log, env=full_env, start_new_session=True)
        started[-1] = proc
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if b"status: 0/" in logfile.read_bytes():
                break
            time.sleep(0.02)
        return Server(port, proc, logfile, maildir, control, state)

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def recv_reply(sock: socket.socket) -> bytes:
    """Read one complete SMTP reply (all its lines) from `sock`; b"" if the server closed."""
    buf = b""
    while True:
        lines = buf.split(b"\r\n")
        for ln in lines[:-1]:
            if len(ln) >= 3 and ln[3:4] != b"-":
                return buf
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk


def children_of(pid: int) -> list[int]:
    """All descendants of `pid`, from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
