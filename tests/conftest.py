"""Shared fixtures: a real tcpserver in front of the wrapper, clients from loopback addresses.

Each client is a different loopback source address (127.0.0.2, .3, ...); a
tcprules CDB made per test gives each its TCPREMOTEHOST and knobs, the way a
postmaster's tcp.smtp does.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pwd
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def need(binary: str) -> str:
    """Return the path of `binary`, or skip the test saying which package provides it."""
    path = shutil.which(binary)
    if path is None:
        packages = {"tcpserver": "ucspi-tcp", "tcprules": "ucspi-tcp", "exim4": "exim4-daemon-light",
                    "redis-server": "redis-server", "swaks": "swaks", "cdb": "tinycdb",
                    "dnsmasq": "dnsmasq-base", "oidentd": "oidentd"}
        if os.environ.get("TEST_REQUIRE_ALL"):
            pytest.fail(f"{binary} not installed but TEST_REQUIRE_ALL is set (CI installs everything)")
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
    user: str | None = None  # tcpserver -u/-g: the wrapper and its backend run as this user

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


def _requirement_name(req: str) -> str | None:
    """The distribution a Requires-Dist line needs here, or None (an extra, or a marker that is false)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        return None if "extra ==" in req else re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
    r = Requirement(req)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        return None
    return r.name


def _installed(name: str) -> importlib.metadata.Distribution | None:
    """The distribution `name` as installed in site-packages: what the console scripts run.

    Not importlib.metadata.distribution(name): with the working directory on sys.path
    (`python3 -m pytest` from the tree) that may find a build's egg-info in the tree.
    """
    found = list(importlib.metadata.distributions(name=name, path=[*site.getsitepackages(),
                                                                     site.getusersitepackages()]))
    return found[0] if found else None


def _copy_distribution_closure(top: str, site_dir: Path) -> None:
    """Copy the installed files of `top` and everything it requires into the directory `site_dir`."""
    seen: set[str] = set()
    todo = [top]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = _installed(name)
        if dist is None:
            continue
        todo.extend(n for n in map(_requirement_name, dist.requires or []) if n)
        for f in dist.files or []:
            if ".." in f.parts or "__pycache__" in f.parts:
                continue
            src = Path(dist.locate_file(f))
            if src.is_file():
                dst = site_dir / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


def _runs_as(uid: int, gid: int, argv: list[str], env: dict[str, str] | None = None) -> bool:
    try:
        done = subprocess.run(argv, user=uid, group=gid, extra_groups=[], cwd="/", env=env,
                              capture_output=True, timeout=60)
    except OSError:  # cannot even exec it (a 0700 directory on the way)
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def user_python():
    """Session cache: user name -> a bin directory (or None) from which that user can run our programs."""
    made: dict[str, Path | None] = {}
    dirs: list[str] = []
    probe = "import libtarpit.session, tarpit_wrappers.tarpit_smtpd, tarpit_wrappers.sink"

    def for_user(user: str) -> Path | None:
        if user in made:
            return made[user]
        pw = pwd.getpwnam(user)
        if _runs_as(pw.pw_uid, pw.pw_gid, [sys.executable, "-c", probe]):
            made[user] = None  # this interpreter and PATH work for the user as they are
            return None
        want = f"python{sys.version_info.major}.{sys.version_info.minor}"
        bases = [b for b in (shutil.which(want, path="/usr/bin:/usr/local/bin"),) if b]
        if not bases or not _runs_as(pw.pw_uid, pw.pw_gid, [bases[0], "-c", "pass"]):
            msg = f"user {user} cannot run {sys.executable} and there is no system {want} it can run"
            if os.environ.get("TEST_REQUIRE_ALL"):
                pytest.fail(msg)
            pytest.skip(msg)
        root = Path(tempfile.mkdtemp(prefix="tarpit-userpy-", dir="/tmp"))
        dirs.append(str(root))
        os.chmod(root, 0o755)
        venv = root / "venv"
        subprocess.run([bases[0], "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        [site_dir] = venv.glob("lib/python*/site-packages")
        _copy_distribution_closure("tarpit-smtpd", site_dir)
        for ep in _installed("tarpit-smtpd").entry_points:
            if ep.group == "console_scripts":
                script = venv / "bin" / ep.name
                script.write_text(f"#!{venv}/bin/python3\nimport sys\nfrom {ep.module} import {ep.attr}\n"
                                  f"sys.exit({ep.attr}())\n")
                script.chmod(0o755)
        subprocess.run(["chmod", "-R", "a+rX,go-w", str(root)], check=True)
        done = subprocess.run([venv / "bin" / "python3", "-c", probe], user=pw.pw_uid, group=pw.pw_gid,
                              extra_groups=[], cwd="/", capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            pytest.fail(f"the virtualenv for user {user} at {venv} cannot import tarpit-smtpd:\n{done.stderr}")
        made[user] = venv / "bin"
        return made[user]

    yield for_user
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tarpit_server(tmp_path, request):
    """Factory: start tcpserver with `rules` (tcprules text) running `command`; stopped at teardown.

    `listener`: run `tarpit-smtpd serve` with the same options instead of tcpserver + tarpit-smtpd.
    `options`: serve's own long options (`--workers=2`), with `listener`.
    `concurrency`: tcpserver's `-c` (and `-b`, its SYN backlog) instead of its default 40.
    `user` (e.g. "nobody"): run unprivileged, the way a postmaster runs it: `tcpserver -u UID
    -g GID`, so the wrapper and its backend run as that user, and:

    - the server's files are in a fresh directory under /tmp (pytest's own is root-only),
      root-owned and not writable by the user: control dir and its files readable (0755/0644),
      rules.cdb readable, server.log opened by root before tcpserver starts;
    - the state dir (TARPIT_STATE_DIR, the SQLite greylist in it) is owned by the user, 0700:
      the only place the wrapper may write;
    - the Maildir is owned by the user too: it is the backend's output, not the wrapper's
      (qmail-queue's setuid stand-in), and `tarpit-sink` runs as the user;
    - if the user cannot run this interpreter (here: pyenv under a 0700 /root), the wrapper
      runs from a small virtualenv on a system python3 of the same minor version, holding a
      copy of the installed tarpit-smtpd distribution and its dependencies
      (`user_python`), put first on PATH.
    """
    need("tcpserver")
    need("tcprules")
    started: list[subprocess.Popen] = []
    private: list[Path] = []

    def start(rules: str, command: list[str] | None = None, env: dict[str, str] | None = None,
              control_files: dict[str, str] | None = None, *, concurrency: int | None = None,
              user: str | None = None, listener: bool = False, options: tuple[str, ...] = ()) -> Server:
        if user is None:
            base = tmp_path / f"server{len(started)}"  # several servers in one test (two MX hosts)
            base.mkdir()
        else:
            bindir = request.getfixturevalue("user_python")(user)
            pw = pwd.getpwnam(user)
            base = Path(tempfile.mkdtemp(prefix=f"tarpit-{user}-", dir="/tmp"))
            private.append(base)
            os.chmod(base, 0o755)
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
        flags = []
        if concurrency is not None:
            flags += ["-c", str(concurrency), "-b", str(concurrency)]
        if user is not None:
            flags += ["-u", str(pw.pw_uid), "-g", str(pw.pw_gid)]
            if bindir is not None:
                full_env["PATH"] = f"{bindir}:{full_env.get('PATH', '/usr/bin:/bin')}"
            full_env["HOME"] = "/nonexistent"
            for p in [base, *base.rglob("*")]:
                os.chown(p, 0, 0)
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
            for p in (state, maildir, *(maildir / sub for sub in ("tmp", "new", "cur"))):
                p.mkdir(exist_ok=True)  # a Maildir that exists is not made up by mailbox.Maildir
                os.chown(p, pw.pw_uid, pw.pw_gid)
                os.chmod(p, 0o700)
        full_env.update(env or {})
        logfile = base / "server.log"
        log = open(logfile, "ab")
        started.append(None)  # reserve the number before starting
        argv = ["tcpserver", "-vRHl0", *flags, "-x", str(base / "rules.cdb"), "127.0.0.1", str(port), *command]
        if listener:  # `tarpit-smtpd serve` in tcpserver's place, the wrapper word dropped
            assert command[0] == "tarpit-smtpd", command
            argv = ["tarpit-smtpd", "serve", *options, *argv[1:argv.index(str(port)) + 1], *command[1:]]
        proc = subprocess.Popen(
            argv,
            stdout=log, stderr=log, env=full_env, start_new_session=True)
        started[-1] = proc
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if b"status: 0/" in logfile.read_bytes():
                break
            time.sleep(0.02)
        return Server(port, proc, logfile, maildir, control, state, user)

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    for base in private:
        shutil.rmtree(base, ignore_errors=True)


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


# --- dnsmasq: a real DNS server with the records a test needs ------------------------------


def udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def _answers(port: int, probe: str) -> bool:
    import dns.exception
    import dns.resolver

    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.port = ["127.0.0.1"], port
    try:
        r.resolve(probe, "A", lifetime=0.5, raise_on_no_answer=False)
        return True
    except dns.resolver.NXDOMAIN:
        return True
    except dns.exception.DNSException:
        return False


class Dnsmasq:
    """A running dnsmasq on 127.0.0.1:`port`; `queries()` is what it was asked, when it logs them."""

    def __init__(self, port: int, log: Path | None):
        self.port, self.log = port, log

    def queries(self) -> list[str]:
        """Every name asked for so far, in order (needs log_queries=True)."""
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        return re.findall(r"query\[\w+\] (\S+) from ", text)

    def wait_query(self, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while name not in self.queries():
            if time.monotonic() > deadline:
                raise AssertionError(f"dnsmasq was never asked for {name}: {self.queries()}")
            time.sleep(0.02)


@contextlib.contextmanager
def running_dnsmasq(records: list[str], local_zones: list[str], log: Path | None = None) -> Iterator[Dnsmasq]:
    """Start dnsmasq in the foreground on a free port with `records`; yield it; stop it.

    Names under `local_zones` that have no record are NXDOMAIN; other zones are REFUSED
    (no upstream). With `log`, every query is written there (--log-queries).
    """
    binary = need("dnsmasq")
    logging = [f"--log-facility={log}", "--log-queries"] if log else ["--log-facility=-"]
    probe = f"probe.{local_zones[0]}."
    err = b""
    for _attempt in range(5):
        port = udp_tcp_port()
        proc = subprocess.Popen(
            [binary, "--keep-in-foreground", *logging, "--conf-file=/dev/null", "--pid-file",
             f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
             "--no-hosts", *(f"--local=/{z}/" for z in local_zones), *records],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline and not _answers(port, probe):
            time.sleep(0.05)
        if proc.poll() is None and _answers(port, probe):
            break
        proc.kill()
        err = proc.communicate()[1]
    else:
        pytest.fail(f"dnsmasq did not start: {err.decode(errors='replace')}")
    try:
        yield Dnsmasq(port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
