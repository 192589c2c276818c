#!/usr/bin/env python3
"""What tarpit-smtpd costs per connection, against a baseline measured in the same run.

    python3 bench/run.py [--quick] [--only latency,memory,exit,install] [--backends mini,sink]
                         [--wrapper COMMAND] [--venv DIR]

Everything runs under a real tcpserver on 127.0.0.1 with a tcprules CDB that
gives each loopback source address its TCPREMOTEHOST and knobs, the way
tests/conftest.py does:

  1. latency  connect -> 220 banner, sequential, interleaved across (a) the
              backend alone, (b) the exec fast path (trusted client) and (c) the
              proxy path (normal client, badheloarg present, TARPIT=0).
              Targets (issue 9): (b) at most +15 ms, (c) at most +22 ms over (a) at the median.
  2. memory   K suspicious clients held in a TARPIT=600 tarpit: PSS of the
              wrappers and of their backends per held connection, against the
              backend alone holding K idle connections.  Target: wrapper <= 5 MB.
  3. exit     M tarpitted clients close during the tarpit: time from close()
              until the wrapper and its backend have exited and been reaped.
              Target: p99 <= 10 ms.
  4. install  the fast path and proxy path with this (editable) install against
              a regular `pip install` of a copy of the tree in a venv, and
              where the start-up time goes (bench/startup_probe.py).

--wrapper runs sections 1-3 on another wrapper command (bench/prototypes/*
measure proposed changes without touching the wrapper); --venv keeps the
regular-install venv of section 4 so such a command can use its Python.

Backends: mini_smtpd (bench/mini_smtpd.c, built here with gcc; a C stand-in
for qmail-smtpd, so the wrapper's own cost is visible) and tarpit-sink.
Every process started here is in a tcpserver process group killed on exit.
Exit status 0 when it ran (whatever PASS/FAIL says), 1 on a missing tool or a
broken run.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
TRUSTED, NORMAL, SUSPICIOUS, SUSPICIOUS_GREY = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
RULES = (
    f'{TRUSTED}:allow,TCPREMOTEHOST="mail.example.com",RELAYCLIENT=""\n'
    f'{NORMAL}:allow,TCPREMOTEHOST="mail.example.com",TARPIT="0"\n'
    f'{SUSPICIOUS}:allow,TCPREMOTEHOST="{DYNAMIC}",TARPIT="600",TARPIT_GREYLIST="off"\n'
    f'{SUSPICIOUS_GREY}:allow,TCPREMOTEHOST="{DYNAMIC}",TARPIT="600"\n'  # default taRgrey, SQLite store
    ":allow\n"
)
LATENCY_TARGET_MS = {"fast": 15.0, "proxy": 22.0}  # issue 9: median over the backend alone
MEMORY_TARGET_MB = 5.0
EXIT_TARGET_MS = 10.0
SERVERS: list["Server"] = []


class BenchError(RuntimeError):
    """The bench cannot go on; the message says what is missing or what broke."""


# --- tools -------------------------------------------------------------------


@dataclass
class Tools:
    """Paths of everything the bench runs."""

    tcpserver: str
    tcprules: str
    wrapper: list[str]
    sink: str
    tarpitctl: str | None
    mini: str
    work: Path
    shim: str | None = None
    installed: str = ""


def find_tools(work: Path) -> Tools:
    """Find the binaries and build mini_smtpd; BenchError naming what is missing."""
    missing = [(b, pkg) for b, pkg in (("tcpserver", "ucspi-tcp"), ("tcprules", "ucspi-tcp"),
                                       ("gcc", "gcc")) if shutil.which(b) is None]
    if missing:
        raise BenchError("missing: " + ", ".join(f"{b} (Debian package {p})" for b, p in missing))
    scripts = sysconfig.get_path("scripts")
    found = {n: shutil.which(n, path=scripts) for n in ("tarpit-smtpd", "tarpit-sink", "tarpitctl")}
    for name in ("tarpit-smtpd", "tarpit-sink"):
        if found[name] is None:
            raise BenchError(f"{name} not in {scripts}: run `pip install -e {REPO}` with {sys.executable}")
    mini = work / "mini_smtpd"
    cc = subprocess.run(["gcc", "-O2", "-o", str(mini), str(HERE / "mini_smtpd.c")],
                        capture_output=True, text=True)
    if cc.returncode != 0:
        raise BenchError(f"gcc could not build bench/mini_smtpd.c:\n{cc.stderr}")
    shim = find_shim(found["tarpit-smtpd"])
    return Tools(shutil.which("tcpserver"), shutil.which("tcprules"), [found["tarpit-smtpd"]],
                 found["tarpit-sink"], found["tarpitctl"], str(mini), work, shim, found["tarpit-smtpd"])


def find_shim(real: str) -> str | None:
    """A tarpit-smtpd on PATH (or in pyenv's shims) that is not `real`: what a shell would run.

    Under `pyenv exec` (a python3 shim) PATH starts with the interpreter's own bin
    directory, so the shim a login shell would find is looked for by name too.
    """
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    dirs.append(os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")), "shims"))
    for d in dirs:
        cand = os.path.join(d, "tarpit-smtpd")
        if os.access(cand, os.X_OK) and os.path.realpath(cand) != os.path.realpath(real):
            return cand
    return None


def make_control(tools: Tools) -> Path:
    """A control directory with a badheloarg list (CDB when tarpitctl can compile it)."""
    control = tools.work / "control"
    control.mkdir(exist_ok=True)
    (control / "badheloarg").write_text("localhost\nlocalhost.localdomain\nexample.invalid\n")
    if tools.tarpitctl:
        subprocess.run([tools.tarpitctl, "cdb", str(control / "badheloarg")],
                       capture_output=True, check=False)
    return control


def make_rules(tools: Tools) -> Path:
    """Compile RULES with tcprules; return the CDB path."""
    text, cdb = tools.work / "rules", tools.work / "rules.cdb"
    text.write_text(RULES)
    with open(text) as f:
        subprocess.run([tools.tcprules, str(cdb), str(tools.work / "rules.tmp")], stdin=f, check=True)
    return cdb


# --- tcpserver ---------------------------------------------------------------


@dataclass
class Server:
    """One tcpserver (own process group) and its log, read incrementally."""

    name: str
    command: list[str]
    env: dict[str, str]
    rules: Path
    log_path: Path
    limit: int = 40
    port: int = 0
    proc: subprocess.Popen | None = None
    connections: int = 0
    _text: bytes = b""
    _offset: int = 0

    def start(self) -> "Server":
        """Start tcpserver on a free port; retry on a port race; BenchError if it will not start."""
        for _ in range(5):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    ["tcpserver", "-vRHl0", "-c", str(self.limit), "-b", "64", "-x", str(self.rules),
                     "127.0.0.1", str(self.port), *self.command],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, start_new_session=True)
            SERVERS.append(self)
            if self._ready():
                return self
            self.stop()
        raise BenchError(f"tcpserver for {self.name} did not start:\n{self.tail()}")

    def _ready(self) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.count(b"tcpserver: status: 0/"):
                return True
            time.sleep(0.005)
        return False

    def count(self, needle: bytes) -> int:
        """How many times `needle` occurs in the log so far."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            new = f.read()
        self._offset += len(new)
        self._text += new
        return self._text.count(needle)

    def wait_count(self, needle: bytes, n: int, timeout: float = 20.0, step: float = 0.001) -> None:
        """Wait until `needle` occurs `n` times in the log; BenchError on timeout."""
        deadline = time.monotonic() + timeout
        while self.count(needle) < n:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: waited {timeout} s for {n} x {needle!r}; log tail:\n{self.tail()}")
            time.sleep(step)

    def wait_idle(self) -> None:
        """Wait until tcpserver has reaped the child of every connection made so far."""
        self.wait_count(b"tcpserver: end ", self.connections)

    def connect(self, src: str) -> socket.socket:
        s = socket.socket()
        s.settimeout(20)
        s.bind((src, 0))
        s.connect(("127.0.0.1", self.port))
        self.connections += 1
        return s

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """TERM then KILL the whole process group (tcpserver, wrappers, backends)."""
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
                time.sleep(0.05)  # children of the group may outlive tcpserver by a moment
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all() -> None:
    while SERVERS:
        SERVERS.pop().stop()


def server_env(tools: Tools, control: Path, cached: bool = True) -> dict[str, str]:
    """The environment of every tcpserver: control dir, greylist file, and a bytecode cache.

    `cached`: drop PYTHONDONTWRITEBYTECODE and cache bytecode under the work
    directory (PYTHONPYCACHEPREFIX), as any real install has its .pyc files; an
    editable install under PYTHONDONTWRITEBYTECODE=1 would otherwise compile
    libtarpit from source at every connection.
    """
    env = dict(os.environ, TARPIT_CONTROL=str(control),
               TARPIT_GREYLIST_URL=str(tools.work / "greylist.sqlite"))
    env.pop("TARPIT_CONFIG", None)
    if cached:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tools.work / "pycache")
    return env


def backend_cmd(tools: Tools, backend: str) -> list[str]:
    return [tools.mini] if backend == "mini" else [tools.sink, str(tools.work / f"Maildir-{backend}")]


# --- SMTP client bits ----------------------------------------------------------


def recv_reply(sock: socket.socket) -> bytes:
    """One complete SMTP reply (every line of it); b"" if the server closed first."""
    buf = b""
    while True:
        for ln in buf.split(b"\r\n")[:-1]:
            if len(ln) >= 3 and ln[3:4] != b"-":
                return buf
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk


def expect(sock: socket.socket, code: bytes, what: str, server: Server) -> None:
    reply = recv_reply(sock)
    if not reply.startswith(code):
        raise BenchError(f"{server.name}: {what}: expected {code.decode()}, got {reply[:200]!r}\n{server.tail()}")


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()


def to_rcpt(server: Server, src: str) -> socket.socket:
    """Connect and walk to MAIL FROM (answered); the caller sends RCPT or holds."""
    s = server.connect(src)
    expect(s, b"220", "banner", server)
    s.sendall(b"EHLO client.example.org\r\n")
    expect(s, b"250", "EHLO", server)
    s.sendall(b"MAIL FROM:<bench@example.org>\r\n")
    expect(s, b"250", "MAIL", server)
    return s


# --- /proc ---------------------------------------------------------------------


def children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rollup(pid: int) -> dict[str, int]:
    """Pss, Rss and USS (private clean + dirty) of `pid`, in kB."""
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except FileNotFoundError as e:
        if not Path("/proc/self/smaps_rollup").exists():
            raise BenchError("/proc/PID/smaps_rollup missing: needs Linux >= 4.14") from e
        raise BenchError(f"process {pid} vanished while measuring") from e
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0])
    return {"pss": fields["Pss"], "rss": fields["Rss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


# --- statistics and printing ------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


# --- 1. connect -> banner latency ---------------------------------------------------


@dataclass
class LatencyCase:
    label: str
    src: str
    server: Server
    times: list[float] = field(default_factory=list)
    path: str = ""  # "fast" or "proxy": which LATENCY_TARGET_MS applies


def banner_once(case: LatencyCase) -> float:
    """One connection: seconds from connect() to the 220 line, then QUIT and wait until all is gone."""
    s = socket.socket()
    s.settimeout(20)
    s.bind((case.src, 0))
    t0 = time.perf_counter()
    s.connect(("127.0.0.1", case.server.port))
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    dt = time.perf_counter() - t0
    case.server.connections += 1
    if not buf.startswith(b"220"):
        raise BenchError(f"{case.label}: expected a 220 banner, got {buf[:200]!r}\n{case.server.tail()}")
    s.sendall(b"QUIT\r\n")
    drain(s)
    case.server.wait_idle()
    return dt


def run_latency(cases: list[LatencyCase], n: int, warmup: int = 3) -> None:
    """Interleave the cases so drift in machine load hits all of them alike."""
    for i in range(warmup + n):
        for case in cases:
            dt = banner_once(case)
            if i >= warmup:
                case.times.append(dt)


def print_latency(cases: list[LatencyCase], base: LatencyCase, target: bool = True) -> list[bool]:
    b_med, b_p99 = statistics.median(base.times) * 1e3, pct(base.times, 99) * 1e3
    print(f"{'':44} {'median':>8} {'p99':>8} {'max':>8}   {'median vs (a)':>15} {'p99 vs (a)':>12}")
    results = []
    for c in cases:
        med, p99, mx = statistics.median(c.times) * 1e3, pct(c.times, 99) * 1e3, max(c.times) * 1e3
        line = f"{c.label:44} {med:8.2f} {p99:8.2f} {mx:8.2f}"
        if c is not base:
            line += f"   {med - b_med:+11.2f} ms {p99 - b_p99:+9.2f} ms  x{med / b_med:.1f}"
            if target and c.path:
                ok = med - b_med <= LATENCY_TARGET_MS[c.path]
                results.append(ok)
                line += f"  {verdict(ok)} (median +{LATENCY_TARGET_MS[c.path]:g} ms max)"
        print(line)
    print(f"{'':44} (ms; n={len(base.times)} each; p99 is nearest rank)")
    return results


def bench_latency(tools: Tools, env: dict[str, str], rules: Path, backend: str, n: int) -> list[bool]:
    heading(f"1. connect -> 220 banner under tcpserver, backend {backend}, {n} sequential connections each")
    cmd = backend_cmd(tools, backend)
    cases = [
        LatencyCase("(a) backend alone", NORMAL, new_server(tools, f"lat-{backend}-a", cmd, env, rules)),
        LatencyCase("(b) fast path: trusted client, exec", TRUSTED,
                    new_server(tools, f"lat-{backend}-b", [*tools.wrapper, *cmd], env, rules), path="fast"),
        LatencyCase("(c) proxy path: normal client, badheloarg", NORMAL,
                    new_server(tools, f"lat-{backend}-c", [*tools.wrapper, *cmd], env, rules), path="proxy"),
    ]
    run_latency(cases, n)
    check_paths(cases[1].server, cases[2].server)
    results = print_latency(cases, cases[0])
    for c in cases:
        c.server.stop()
    return results


def check_paths(fast: Server, proxy: Server) -> None:
    """Make sure each case really took the path it is named after."""
    if fast.count(b"event=exec") < fast.connections:
        raise BenchError(f"{fast.name}: the trusted client did not take the exec fast path\n{fast.tail()}")
    if proxy.count(b"event=exec") or not proxy.count(b"event=connect"):
        raise BenchError(f"{proxy.name}: the normal client did not take the proxy path\n{proxy.tail()}")


def new_server(tools: Tools, name: str, command: list[str], env: dict[str, str], rules: Path,
               limit: int = 40) -> Server:
    return Server(name, command, env, rules, tools.work / f"{name}.log", limit).start()


# --- 2. memory per held connection ----------------------------------------------------


def hold(server: Server, k: int, tarpit: bool, src: str = SUSPICIOUS) -> list[socket.socket]:
    """Open k connections up to MAIL; with `tarpit`, send RCPT and wait until all are in the tarpit."""
    socks = []
    for _ in range(k):
        s = to_rcpt(server, src)
        if tarpit:
            s.sendall(b"RCPT TO:<bob@example.com>\r\n")
        socks.append(s)
    if tarpit:
        server.wait_count(b"event=tarpit_start", k)
    time.sleep(0.2)  # let the last ones finish what follows their log line
    return socks


def measure_tree(tools: Tools, server: Server, wrapped: bool) -> tuple[list[dict], list[dict]]:
    """rollups of the wrappers and of the backends under `server` (no wrappers when not `wrapped`)."""
    kids = children()
    top = kids.get(server.proc.pid, [])
    if not wrapped:
        return [], [rollup(p) for p in top]
    mark = os.path.basename(tools.wrapper[-1])
    if not all(mark in cmdline(p) for p in top):
        raise BenchError(f"{server.name}: a child of tcpserver is not the wrapper: {[cmdline(p) for p in top]}")
    back = [c for p in top for c in kids.get(p, [])]
    return [rollup(p) for p in top], [rollup(p) for p in back]


def total(rolls: list[dict], key: str) -> float:
    return sum(r[key] for r in rolls) / 1024


def release(server: Server, socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()
    server.wait_idle()
    server.stop()


def bench_memory(tools: Tools, env: dict[str, str], rules: Path, backend: str, k: int) -> list[bool]:
    heading(f"2. memory: {k} suspicious clients held in a TARPIT=600 tarpit, backend {backend}")
    cmd = backend_cmd(tools, backend)
    alone = new_server(tools, f"mem-{backend}-alone", cmd, env, rules, limit=k + 10)
    socks = hold(alone, k, tarpit=False)
    _, base = measure_tree(tools, alone, wrapped=False)
    release(alone, socks)
    results = []
    for label, src in (("greylist off", SUSPICIOUS), ("default taRgrey, SQLite store", SUSPICIOUS_GREY)):
        print(f"-- {label}")
        # a store of its own: clients released by an earlier run were recorded as lost in the tarpit
        own = dict(env, TARPIT_GREYLIST_URL=str(tools.work / f"greylist-mem-{backend}-{src}.sqlite"))
        wrapped = new_server(tools, f"mem-{backend}-wrapped-{src}", [*tools.wrapper, *cmd], own, rules,
                             limit=k + 10)
        socks = hold(wrapped, k, tarpit=True, src=src)
        wrappers, backs = measure_tree(tools, wrapped, wrapped=True)
        release(wrapped, socks)
        if len(wrappers) != k or len(backs) != k or len(base) != k:
            raise BenchError(f"expected {k} processes each, found wrappers={len(wrappers)} "
                             f"backends={len(backs)} baseline={len(base)}")
        results += print_memory(k, wrappers, backs, base)
    return results


def print_memory(k: int, wrappers: list[dict], backs: list[dict], base: list[dict]) -> list[bool]:
    print(f"{'MB per held connection':44} {'PSS':>8} {'USS':>8} {'RSS':>8}")
    rows = [("wrapper alone", wrappers), ("its backend (behind the wrapper)", backs),
            ("wrapper + backend", wrappers + backs), ("(baseline) backend alone, idle after MAIL", base)]
    for label, rolls in rows:
        print(f"{label:44} {total(rolls, 'pss') / k:8.2f} {total(rolls, 'uss') / k:8.2f} "
              f"{total(rolls, 'rss') / k:8.2f}")
    w, wb, b = total(wrappers, "pss") / k, total(wrappers + backs, "pss") / k, total(base, "pss") / k
    ok = w <= MEMORY_TARGET_MB
    print(f"wrapper+backend vs backend alone: {wb - b:+.2f} MB PSS per connection (x{wb / b:.1f})")
    print(f"wrapper PSS per connection {w:.2f} MB: {verdict(ok)} (target <= {MEMORY_TARGET_MB:g} MB)")
    return [ok]


# --- 3. exit latency ---------------------------------------------------------------------


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def wait_exits(pids: list[int], t0: float, timeout: float = 10.0) -> dict[int, float]:
    """Seconds after t0 at which each pid exited (pidfd readable, or /proc gone without pidfd)."""
    fds = {pid: open_pidfd(pid) for pid in pids}
    done: dict[int, float] = {}
    poller = select.poll()
    for pid, fd in fds.items():
        if fd is not None:
            poller.register(fd, select.POLLIN)
    deadline = t0 + timeout
    try:
        while len(done) < len(pids) and time.perf_counter() < deadline:
            ready = {fd for fd, _ in poller.poll(0.2 if None in fds.values() else 1000)}
            now = time.perf_counter()
            for pid, fd in fds.items():
                if pid not in done and (fd in ready if fd is not None else not os.path.exists(f"/proc/{pid}")):
                    done[pid] = now - t0
                    if fd is not None:
                        poller.unregister(fd)
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    return done


def wait_reaped(pids: list[int], t0: float, timeout: float = 10.0) -> float:
    """Seconds after t0 at which the last of `pids` left /proc (reaped), polled every 0.1 ms."""
    deadline = t0 + timeout
    while any(os.path.exists(f"/proc/{p}") for p in pids):
        if time.perf_counter() > deadline:
            raise BenchError(f"processes {pids} still in /proc {timeout} s after the client closed")
        time.sleep(0.0001)
    return time.perf_counter() - t0


@dataclass
class ExitSample:
    wrapper: float
    backend: float
    reaped: float


def exit_once(server: Server, i: int) -> ExitSample:
    """One tarpitted connection closed by the client; when did each process go."""
    s = to_rcpt(server, SUSPICIOUS)
    s.sendall(b"RCPT TO:<bob@example.com>\r\n")
    server.wait_count(b"event=tarpit_start", i + 1)
    kids = children()
    [wrapper] = kids.get(server.proc.pid, [0])
    [backend] = kids.get(wrapper, [0])
    if not wrapper or not backend:
        raise BenchError(f"{server.name}: wrapper {wrapper} / backend {backend} not found\n{server.tail()}")
    time.sleep(0.02)  # the wrapper is now inside its poll(), as a real tarpit would be
    t0 = time.perf_counter()
    s.close()
    exits = wait_exits([wrapper, backend], t0)
    reaped = wait_reaped([wrapper, backend], t0)
    if len(exits) != 2:
        raise BenchError(f"{server.name}: processes still running 10 s after close\n{server.tail()}")
    server.wait_idle()
    return ExitSample(exits[wrapper], exits[backend], reaped)


def alone_exit_once(server: Server) -> float:
    """Baseline: the backend alone, client closes after MAIL; seconds until it is reaped."""
    s = to_rcpt(server, SUSPICIOUS)
    [pid] = children().get(server.proc.pid, [0]) or [0]
    if not pid:
        raise BenchError(f"{server.name}: backend process not found\n{server.tail()}")
    time.sleep(0.02)
    t0 = time.perf_counter()
    s.close()
    wait_exits([pid], t0)
    reaped = wait_reaped([pid], t0)
    server.wait_idle()
    return reaped


def bench_exit(tools: Tools, env: dict[str, str], rules: Path, backend: str, m: int) -> list[bool]:
    heading(f"3. exit: {m} clients close during a TARPIT=600 tarpit, backend {backend}")
    cmd = backend_cmd(tools, backend)
    alone = new_server(tools, f"exit-{backend}-alone", cmd, env, rules)
    base = [alone_exit_once(alone) * 1e3 for _ in range(m)]
    alone.stop()
    server = new_server(tools, f"exit-{backend}", [*tools.wrapper, *cmd], env, rules)
    samples = [exit_once(server, i) for i in range(m)]
    lost = server.count(b"event=tarpit_lost")
    server.stop()
    if lost != m:
        raise BenchError(f"exit-{backend}: {lost} tarpit_lost lines for {m} connections")
    print(f"{'ms after close()':50} {'median':>8} {'p99':>8} {'max':>8}")
    rows = [("(baseline) backend alone, idle after MAIL: reaped", base)]
    rows += [(label, [getattr(x, key) * 1e3 for x in samples]) for label, key in (
        ("tarpit: backend exited", "backend"), ("tarpit: wrapper exited", "wrapper"),
        ("tarpit: both reaped (gone from /proc)", "reaped"))]
    for label, vals in rows:
        print(f"{label:50} {statistics.median(vals):8.2f} {pct(vals, 99):8.2f} {max(vals):8.2f}")
    p99 = pct([x.reaped for x in samples], 99) * 1e3
    ok = p99 <= EXIT_TARGET_MS
    print(f"all gone p99 {p99:.2f} ms: {verdict(ok)} (target p99 <= {EXIT_TARGET_MS:g} ms)")
    return [ok]


# --- 4. editable vs regular install ------------------------------------------------------


@dataclass
class Install:
    """One way of installing the project: its label, Python and tarpit-smtpd."""

    label: str
    python: str
    wrapper: str


def build_venvs(tools: Tools, keep: str | None) -> list[Install]:
    """Venvs with an editable and a regular install of a copy of the tree; [] (said why) if pip fails.

    The copy keeps pip's in-tree build (build/, *.egg-info) out of the repository.
    With `keep`, everything lives in that directory and is reused next time.
    """
    base = Path(keep).resolve() if keep else tools.work / "venvs"
    out = []
    for label, editable in (("edit venv", True), ("regular", False)):
        venv = base / ("editable" if editable else "regular")
        if not (venv / "bin" / "tarpit-smtpd").exists():
            error = make_venv(base / "src", venv, editable)
            if error:
                print(f"skipped: could not build a venv with `pip install{' -e' if editable else ''}`:\n{error}")
                return []
        else:
            print(f"reusing {venv}")
        out.append(Install(label, str(venv / "bin" / "python"), str(venv / "bin" / "tarpit-smtpd")))
    return out


def make_venv(src: Path, venv: Path, editable: bool) -> str:
    """Copy the tree to `src` (once) and pip-install it into a new venv; return stderr on failure."""
    if not (src / "pyproject.toml").exists():
        src.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "pyproject.toml", src)
        for d in ("libtarpit", "wrappers"):
            shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                               *(["-e"] if editable else []), str(src)], capture_output=True, text=True)
    return made.stderr[-1500:] if made.returncode != 0 else ""


def startup_ms(argv: list[str], n: int, env: dict[str, str]) -> float:
    """Median wall time of running argv to its end, in ms (after one unmeasured run)."""
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=env)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def probe(python: str, n: int, env: dict[str, str], *flags: str) -> dict[str, float]:
    """Median value per step of bench/startup_probe.py over n fresh processes (ms, or MB with --memory)."""
    runs: dict[str, list[float]] = {}
    argv = [python, str(HERE / "startup_probe.py"), *flags]
    subprocess.run(argv, env=env, capture_output=True)  # warm the bytecode cache
    for _ in range(n):
        out = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if out.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed:\n{out.stderr[-1500:]}")
        for line in out.stdout.splitlines():
            label, value = line.split("\t")
            runs.setdefault(label, []).append(float(value))
    return {label: statistics.median(v) for label, v in runs.items()}


PROBE_ENV = {
    "fast": {"TCPREMOTEIP": TRUSTED, "TCPREMOTEHOST": "mail.example.com", "RELAYCLIENT": ""},
    "proxy": {"TCPREMOTEIP": NORMAL, "TCPREMOTEHOST": "mail.example.com", "TARPIT": "0"},
    # suspicious, default taRgrey + SQLite: up to spawning the backend (greylist store open)
    "tarpit": {"TCPREMOTEIP": SUSPICIOUS_GREY, "TCPREMOTEHOST": DYNAMIC, "TARPIT": "600"},
}


def print_probe(installs: list[Install], n: int, env: dict[str, str], path: str) -> None:
    """One table: each step of the `path` start-up, ms then MB USS, one column per install."""
    penv = dict(env, **PROBE_ENV[path])
    ms = [probe(i.python, n, penv, path) for i in installs]
    mb = [probe(i.python, 3, penv, path, "--memory") for i in installs]
    labels: list[str] = []
    for table in ms:
        labels += [label for label in table if label not in labels]
    heads = " ".join(f"{i.label[:9]:>9}" for i in installs)
    print(f"{path + ' path, each step in process (median)':46} ms: {heads} | MB USS: {heads}")
    for label in labels + ["sum of the steps"]:
        row = [sum(t.values()) if label == "sum of the steps" else t.get(label, math.nan) for t in ms + mb]
        cells = [f"{v:9.2f}" for v in row]
        print(f"{label[:46]:46}     {' '.join(cells[:len(installs)])} |         {' '.join(cells[len(installs):])}")


def print_startup(installs: list[Install], n: int, env: dict[str, str]) -> None:
    """Interpreter start-up with and without site, then the probe's breakdown, per install."""
    heads = " ".join(f"{i.label[:9]:>9}" for i in installs)
    print(f"{'process run to its end, median ms':50} {heads}")
    for label, *args in (("python -c pass", "-c", "pass"), ("python -S -c pass (no site, no .pth)", "-S", "-c", "pass")):
        cells = " ".join(f"{startup_ms([i.python, *args], n, env):9.2f}" for i in installs)
        print(f"{label:50} {cells}")
    for path in ("fast", "proxy", "tarpit"):
        print_probe(installs, n, env, path)
    print("(a stdlib step reads ~0 where a site .pth imported that module already;"
          " nan: the step does not occur there)")


def bench_install(tools: Tools, env: dict[str, str], rules: Path, n: int, keep: str | None) -> None:
    mode = install_mode()
    heading(f"4. this install ({mode}) vs an editable and a regular install in clean venvs, backend mini, n={n}")
    venvs = build_venvs(tools, keep)
    if not venvs:
        return
    installs = [Install(f"this {mode}"[:9], sys.executable, tools.installed), *venvs]
    print_startup(installs, max(10, n // 4), env)
    variants = [(i.label, [i.wrapper], env) for i in installs]
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        as_is = server_env(tools, Path(env["TARPIT_CONTROL"]), cached=False)
        variants.append((f"{installs[0].label}, env as is", [tools.installed], as_is))
    if tools.shim:
        variants.append((f"{installs[0].label} via PATH shim", [tools.shim], env))
    cmd = backend_cmd(tools, "mini")
    cases = [LatencyCase("(a) backend alone", NORMAL, new_server(tools, "inst-a", cmd, env, rules))]
    for k, (name, wrapper, wenv) in enumerate(variants):
        for path, src in (("fast", TRUSTED), ("proxy", NORMAL)):
            server = new_server(tools, f"inst-{path}-{k}", [*wrapper, *cmd], wenv, rules)
            cases.append(LatencyCase(f"{path} path, {name}", src, server))
    print("connect -> 220 banner, interleaved:")
    run_latency(cases, n)
    print_latency(cases, cases[0], target=False)
    print(f"('{installs[0].label}': {tools.installed}; 'edit venv' / 'regular': pip install -e / pip install "
          "of a copy of the tree in a clean venv, so only the project's own .pth is there)")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("('env as is': PYTHONDONTWRITEBYTECODE=1 kept and no bytecode cache: modules without an "
              "up-to-date .pyc in the tree are compiled from source at every start)")
    if tools.shim:
        print(f"(PATH shim: {tools.shim} runs {tools.installed} through pyenv)")
    for c in cases:
        c.server.stop()


# --- main ----------------------------------------------------------------------------------


def revision() -> str:
    """The repository's HEAD and whether the tree has uncommitted changes to the measured code."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "libtarpit", "wrappers"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{head}{' + uncommitted changes in libtarpit/ or wrappers/' if dirty else ''}"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; nproc {os.cpu_count()}; {cpu}; "
            f"Linux {os.uname().release}; Python {sys.version.split()[0]} ({sys.executable}); "
            f"loadavg at start {os.getloadavg()[0]:.2f}")


def install_mode() -> str:
    """How tarpit-smtpd is installed for this Python: editable, regular or missing."""
    import json
    from importlib import metadata

    try:
        dist = metadata.distribution("tarpit-smtpd")
    except metadata.PackageNotFoundError:
        return "missing"
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    return "editable" if direct.get("dir_info", {}).get("editable") else "regular"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tarpit-smtpd benchmarks (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="fewer connections (40/10/20) for a fast look")
    p.add_argument("--only", default="latency,memory,exit,install",
                   help="comma list of: latency, memory, exit, install")
    p.add_argument("--backends", default="mini,sink", help="comma list of: mini, sink")
    p.add_argument("--wrapper", metavar="COMMAND",
                   help="the wrapper command to measure, e.g. \"/tmp/v/bin/python bench/prototypes/early_exec.py\" "
                        "(default: tarpit-smtpd next to this Python)")
    p.add_argument("--venv", metavar="DIR",
                   help="for `install`: build the venvs in DIR/editable and DIR/regular (from a copy "
                        "of the tree in DIR/src) and keep them; reused when present")
    args = p.parse_args(argv)
    bad = (set(args.only.split(",")) - {"latency", "memory", "exit", "install"}) | \
        (set(args.backends.split(",")) - {"mini", "sink"})
    if bad:
        p.error(f"unknown: {', '.join(sorted(bad))}")
    return args


def run_all(args: argparse.Namespace, tools: Tools) -> list[bool]:
    n, k, m = (40, 10, 20) if args.quick else (200, 50, 100)
    only, backends = set(args.only.split(",")), args.backends.split(",")
    env, rules = server_env(tools, make_control(tools)), make_rules(tools)
    results: list[bool] = []
    for backend in backends:
        if "latency" in only:
            results += bench_latency(tools, env, rules, backend, n)
        if "memory" in only:
            results += bench_memory(tools, env, rules, backend, k)
        if "exit" in only:
            results += bench_exit(tools, env, rules, backend, m)
    if "install" in only:
        bench_install(tools, env, rules, n, args.venv)
    return results


def on_term(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    work = Path(tempfile.mkdtemp(prefix="tarpit-bench-"))
    try:
        tools = find_tools(work)
        if args.wrapper:
            tools.wrapper = [os.path.abspath(w) if os.path.exists(w) else w for w in shlex.split(args.wrapper)]
        print(f"# {machine()}\n# code {revision()}\n# mode {'quick' if args.quick else 'full'}; wrapper {shlex.join(tools.wrapper)} "
              f"(this Python's tarpit-smtpd: {install_mode()} install)")
        results = run_all(args, tools)
        if results:
            print(f"\n{sum(results)}/{len(results)} targets met")
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every tcpserver started here", file=sys.stderr)
        return 130
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
