"""Thousands of clients held by `tarpit-smtpd serve`: memory, CPU, and how fast a close frees one.

    python3 bench/serve_hold.py                # ~4 min: K=10000 greet pause, K=2000 RCPT tarpit
    python3 bench/serve_hold.py --quick        # < 1 min: K=1000 / 300, 5 s CPU windows, 50 closes
    python3 bench/serve_hold.py -k 5000 --tarpit-k 1000 --cpu-seconds 10 --closes 100

Holds clients where a bot storm is held, on loopback, each client from its own source
address (127.1.x.y, so neither a per-IP cap nor the ephemeral port range limits the run),
with tcprules giving every client the suspicious name p1234-ipbf56abcdef.tokyo.ocn.ne.jp
and the knobs of the case:

  (a) greet pause   GREETDELAY=600: the client connects and waits; no backend yet
                    (what postscreen's greet wait and Haraka's early_talker hold)
  (b) RCPT tarpit   TARPIT=600, taRgrey off: HELO, MAIL, RCPT, then held; each client has
                    its backend (bench/mini_smtpd.c, built here) from the banner on

For each case, `tarpit-smtpd serve` against two baselines measured in the same run, each
holding the same kind of client the same way:
  tcpserver + mini_smtpd alone   a backend process per client (idle after the banner
                                 for (a), after RCPT's 250 for (b); min(K, 1000) clients)
  tcpserver + tarpit-smtpd       the wrapper, one Python process per client (K=40)

Measured per case:
  memory   PSS growth per held client from /proc/PID/smaps_rollup (serve: the listener;
           baselines: tcpserver and every process under it), after 20 warm-up clients
  CPU      utime+stime from /proc/PID/stat over --cpu-seconds while holding them, as % of
           one core (serve: the listener; baselines: the whole process tree)
  close    --closes held clients closed one at a time (the others still held); from the
           close() until the server has freed it, seen from outside, polled every ~0.1 ms:
           serve: its fd for that client's socket gone from /proc/PID/fd (found by inode
           through /proc/net/tcp) and, for (b), the backend reaped (its /proc/PID gone);
           baselines: every process of that client reaped (found by TCPREMOTEPORT in
           /proc/PID/environ).  The `end` log line is timed too.
Issue 12's targets: <= 6 KB per held client, < 1 % of a core, close median <= 2 ms.

After each serve run, every client is closed and the run checks what serve left: `end`
lines against `connect` lines, fds against before, backends still running, `error` lines,
and any bytes the held clients were sent.  RLIMIT_NOFILE's soft limit is raised to the
hard limit; K is cut (and the run says so) when the hard limit is too low.  Needs tcpserver,
tcprules (ucspi-tcp), gcc and the project installed.  Not run by pytest.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package: its helpers are imported from here
from serve_latency import free_port, start
from serve_memory import pss_kb

SUSPICIOUS = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
KNOBS = {"greet": 'GREETDELAY="600",TARPIT_GREYLIST="off"',
         "tarpit": 'TARPIT="600",TARPIT_GREYLIST="off"'}
WALK = {"greet": [], "tarpit": [b"HELO bot.example\r\n", b"MAIL FROM:<x@example.org>\r\n",
                                b"RCPT TO:<bob@example.com>\r\n"]}
WARM = 20
TARGET_KB, TARGET_CPU, TARGET_CLOSE_MS = 6.0, 1.0, 2.0


# --- /proc ---------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc (a process that exits meanwhile is skipped)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of `pids` in clock ticks (a process gone meanwhile counts 0)."""
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total


def client_of(pid: int) -> tuple[str, int] | None:
    """(TCPREMOTEIP, TCPREMOTEPORT) from the environment of `pid`; None when it has none."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    vals = dict(e.split(b"=", 1) for e in env if b"=" in e)
    if b"TCPREMOTEPORT" not in vals:
        return None
    return vals.get(b"TCPREMOTEIP", b"").decode(), int(vals[b"TCPREMOTEPORT"])


def socket_inodes(server_port: int) -> dict[tuple[str, int], int]:
    """The server side of every established loopback connection to `server_port`: peer -> inode."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, inode = f[1], f[2], int(f[9])
        if int(local.split(":")[1], 16) != server_port or inode == 0:
            continue
        rip, rport = remote.split(":")
        ip = socket.inet_ntoa(int(rip, 16).to_bytes(4, "little"))
        out[(ip, int(rport, 16))] = inode
    return out


def fds_by_inode(pid: int) -> dict[int, int]:
    """socket inode -> fd number, for the sockets `pid` holds."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(link[8:-1])] = int(fd)
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class LogTail:
    """Counts of a word in a growing log file, read incrementally."""

    WORDS = (b"event=connect", b"event=tarpit_start", b"event=end", b"tcpserver: end")

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        self.tail = b""
        self.counts = dict.fromkeys(self.WORDS, 0)
        self.errors: list[str] = []

    def count(self, word: bytes) -> int:
        self.read()
        return self.counts[word]

    def read(self) -> None:
        while True:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return
            lines = (self.tail + chunk).split(b"\n")
            self.tail = lines.pop()
            for ln in lines:
                for w in self.counts:
                    if w in ln:
                        self.counts[w] += 1
                # serve's own error lines, and the last line of whatever Python printed
                if b"event=error" in ln or b"serve: error" in ln or b"Exception ignored" in ln or (
                        ln[:1].isalpha() and b"Error: " in ln and b"event=" not in ln):
                    self.errors.append(ln.decode(errors="replace")[:100])


# --- clients ---------------------------------------------------------------------

class Clients:
    """Many non-blocking client sockets, each from its own loopback address, walked by one selector.

    A client reads a complete reply (the banner first), then sends the next line of `walk`;
    after the last line it is left alone.  With an empty walk it only connects (a greet
    pause sends nothing).  Bytes received after the walk and early closes are counted:
    a held client should get nothing.
    """

    def __init__(self, port: int, walk: list[bytes], base: int, reply_to_last: bool = False):
        self.port, self.walk, self.base = port, walk, base
        self.reply_to_last = reply_to_last  # walked once the last line (or the banner) is answered
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.replies: dict[int, list] = {}  # fd -> [complete replies seen, partial line]
        self.walked = 0
        self.failed: list[str] = []
        self.unexpected: dict[bytes, int] = {}
        self.closed_by_server = 0

    def addr(self, i: int) -> str:
        i += self.base
        return f"127.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"

    def open_one(self) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.bind((self.addr(len(self.socks)), 0))
        err = s.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            self.failed.append(os.strerror(err))
            s.close()
            return
        self.socks.append(s)
        self.replies[s.fileno()] = [0, b""]
        self.sel.register(s, selectors.EVENT_WRITE)

    def poll(self, timeout: float) -> None:
        n = len(self.walk)
        for key, ev in self.sel.select(timeout):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            st = self.replies[s.fileno()]
            if ev & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.failed.append(os.strerror(err))
                    self.sel.unregister(s)
                    continue
                self.sel.modify(s, selectors.EVENT_READ)
                if not n and not self.reply_to_last:
                    self.walked += 1
                continue
            try:
                data = s.recv(4096)
            except OSError as e:
                data = b""
                self.note(f"[{e.strerror}]".encode())
            if not data:
                self.closed_by_server += 1
                self.sel.unregister(s)
                continue
            st[1] += data
            while b"\r\n" in st[1]:
                line, st[1] = st[1].split(b"\r\n", 1)
                if line[3:4] == b"-":
                    continue
                st[0] += 1
                if st[0] <= n:  # the banner, then each reply, asks for the next line
                    s.send(self.walk[st[0] - 1])
                    if st[0] == n and not self.reply_to_last:
                        self.walked += 1
                elif st[0] == n + 1 and self.reply_to_last:
                    self.walked += 1
                else:
                    self.note(line)

    def note(self, data: bytes) -> None:
        key = data[:40]
        self.unexpected[key] = self.unexpected.get(key, 0) + 1

    def hold(self, n: int, held, window: int = 200, stall: float = 60.0) -> float:
        """Open `n` more clients, at most `window` not yet held at once, until held() counts
        all of them; return the seconds it took.  SystemExit when nothing moves for `stall` s."""
        want = len(self.socks) + n
        t0 = last = time.monotonic()
        done = 0
        while True:
            now_held = held()
            if now_held > done:
                done, last = now_held, time.monotonic()
            if done >= want:
                return time.monotonic() - t0
            room = min(window - (len(self.socks) - done), want - len(self.socks), 50)
            for _ in range(max(0, room)):
                self.open_one()
            self.poll(0.005)
            if time.monotonic() - last > stall:
                raise SystemExit(f"stuck: {done} of {want} clients held after {stall:g} s without progress; "
                                 f"failed connects {len(self.failed)}, replies {self.unexpected}")

    def drain(self) -> None:
        """Read whatever arrived, without waiting."""
        self.poll(0)

    def close(self, s: socket.socket) -> None:
        try:
            self.sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()

    def close_all(self) -> None:
        for s in self.socks:
            if s.fileno() >= 0:
                self.close(s)
        self.sel.close()


# --- one server ---------------------------------------------------------------------

def serve_tree(kind: str, pid: int) -> list[int]:
    """The processes whose memory and CPU count for `kind` (serve: the listener alone)."""
    return [pid] if kind == "serve" else [pid, *descendants(pid)]


def measure(kind: str, case: str, k: int, args, work: Path, mini: Path, wrapper: str, base: int) -> dict:
    """Hold `k` clients (after WARM) in `case` under server `kind`; return the numbers."""
    tag = f"{kind}-{case}"
    rules = work / f"{tag}.rules"
    rules.write_text(f'127.:allow,TCPREMOTEHOST="{SUSPICIOUS}",{KNOBS[case]}\n:allow\n')
    with open(rules) as f:
        subprocess.run(["tcprules", str(work / f"{tag}.cdb"), str(work / f"{tag}.tmp")], stdin=f, check=True)
    state = work / f"state-{tag}"
    state.mkdir()
    env = dict(os.environ, TARPIT_CONTROL=str(work / "control"), TARPIT_STATE_DIR=str(state),
               TARPIT_GREYLIST_URL=str(state / "greylist.sqlite"))
    env.pop("TARPIT_CONFIG", None)
    port = free_port()
    opts = ["-vRHl0", "-c", str(k + WARM + 50), "-b", "1024", "-x", str(work / f"{tag}.cdb"), "127.0.0.1", str(port)]
    argv = {"serve": [wrapper, "serve", *opts, str(mini)],
            "tcpserver": ["tcpserver", *opts, str(mini)],
            "wrapper": ["tcpserver", *opts, wrapper, str(mini)]}[kind]
    log = work / f"{tag}.log"
    proc = start(argv, env, log)
    tail = LogTail(log)
    # the backend alone holds a client once it answered its last line (or sent its banner)
    clients = Clients(port, WALK[case], base, reply_to_last=kind == "tcpserver")
    if kind == "tcpserver":
        held = lambda: clients.walked
    else:
        word = b"event=connect" if case == "greet" else b"event=tarpit_start"
        held = lambda: tail.count(word)
    out: dict = {"kind": kind, "case": case, "k": k}
    try:
        clients.hold(WARM, held)
        time.sleep(0.5)
        fds0 = fd_count(proc.pid)
        tree = serve_tree(kind, proc.pid)
        before = sum(pss_kb(p) for p in tree)
        out["hold_s"] = clients.hold(k, held)
        time.sleep(1.0)
        clients.drain()
        tree = serve_tree(kind, proc.pid)
        after = sum(pss_kb(p) for p in tree)
        out["kb"] = (after - before) / k
        if kind == "serve":
            kids = descendants(proc.pid)
            out["backend_kb"] = sum(pss_kb(p) for p in kids) / max(1, len(kids)) if kids else 0.0
        kids = descendants(proc.pid) if kind == "serve" else []
        t0, c0, b0 = time.monotonic(), cpu_ticks(tree), cpu_ticks(kids)
        time.sleep(args.cpu_seconds)
        c1, b1, t1 = cpu_ticks(tree), cpu_ticks(kids), time.monotonic()
        tick = os.sysconf("SC_CLK_TCK")
        out["cpu"] = 100.0 * (c1 - c0) / tick / (t1 - t0)
        out["backend_cpu"] = 100.0 * (b1 - b0) / tick / (t1 - t0)
        out.update(close_times(kind, proc.pid, port, clients, tail, args.closes))
        clients.drain()
        out["unexpected"] = dict(clients.unexpected)
        out["failed"] = len(clients.failed)
        out["closed_by_server"] = clients.closed_by_server
        if kind == "serve":
            out.update(leftovers(proc.pid, clients, tail, fds0))
        return out
    finally:
        clients.close_all()
        os.killpg(proc.pid, 15)
        proc.wait()


def close_times(kind: str, pid: int, port: int, clients: Clients, tail: LogTail, n: int) -> dict:
    """Close `n` held clients one at a time; ms from close() to freed and to the `end` line."""
    socks = [s for s in clients.socks[WARM:] if s.fileno() >= 0][:n]
    peers = {s.getsockname(): s for s in socks}
    inodes = socket_inodes(port) if kind == "serve" else {}
    fds = fds_by_inode(pid) if kind == "serve" else {}
    procs: dict[tuple[str, int], list[int]] = {}
    for p in descendants(pid):
        c = client_of(p)
        if c in peers:
            procs.setdefault(c, []).append(p)
    end_word = b"event=end" if kind == "serve" else b"tcpserver: end"
    freed, ended, fd_ms, reap_ms = [], [], [], []
    missing = 0
    for peer, s in peers.items():
        fd = fds.get(inodes.get(peer, -1))
        link = f"/proc/{pid}/fd/{fd}"
        want_link = f"socket:[{inodes.get(peer)}]"
        pids = procs.get(peer, [])
        if kind == "serve" and fd is None or kind != "serve" and not pids:
            missing += 1
            continue
        ends0 = tail.count(end_word)
        t0 = time.perf_counter()
        clients.close(s)
        t_fd = t_reap = t_end = None
        deadline = t0 + 5.0
        while time.perf_counter() < deadline and (t_end is None or t_fd is None or t_reap is None):
            now = time.perf_counter()
            if t_fd is None:
                if fd is None:
                    t_fd = now
                else:
                    try:
                        gone = os.readlink(link) != want_link
                    except OSError:
                        gone = True
                    if gone:
                        t_fd = now
            if t_reap is None and not any(os.path.exists(f"/proc/{p}") for p in pids):
                t_reap = now
            if t_end is None and tail.count(end_word) > ends0:
                t_end = now
            time.sleep(0.0001)
        if None in (t_fd, t_reap, t_end):
            missing += 1
            continue
        fd_ms.append((t_fd - t0) * 1000)
        reap_ms.append((t_reap - t0) * 1000)
        freed.append((max(t_fd, t_reap) - t0) * 1000)
        ended.append((t_end - t0) * 1000)
    return {"freed": freed, "ended": ended, "fd_ms": fd_ms, "reap_ms": reap_ms, "close_missing": missing}


def leftovers(pid: int, clients: Clients, tail: LogTail, fds0: int) -> dict:
    """Close every client, then what serve still holds after 15 s: fds, backends, sessions."""
    clients.close_all()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if tail.count(b"event=end") >= tail.count(b"event=connect") and not descendants(pid):
            break
        time.sleep(0.1)
    time.sleep(0.5)
    return {"connects": tail.count(b"event=connect"), "ends": tail.count(b"event=end"),
            "fds_left": fd_count(pid) - fds0, "backends_left": len(descendants(pid)),
            "errors": tail.errors}


# --- report ---------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def vs(x: float, base: float, unit: str) -> str:
    ratio = f"x{x / base:.3g}" if base else "x-"
    return f"{x - base:+9.2f} {unit} {ratio:>8s}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(case: str, rows: dict[str, dict]) -> None:
    s, t, w = rows["serve"], rows.get("tcpserver"), rows.get("wrapper")
    title = {"greet": "(a) greet pause, no backend", "tarpit": "(b) RCPT tarpit, a mini_smtpd backend each"}[case]
    print(f"\n{title}: serve K={s['k']} (held in {s['hold_s']:.1f} s, "
          f"{s['k'] / s['hold_s']:.0f} clients/s); baselines: tcpserver + mini_smtpd K={t['k']}, "
          f"tcpserver + wrapper K={w['k']}")
    print(f"  {'measure':44s} {'serve':>9s} | {'vs tcpserver + mini_smtpd':>31s} | {'vs tcpserver + wrapper':>31s} | target")
    mem = s["kb"] + (s.get("backend_kb", 0.0) if case == "tarpit" else 0.0)
    print(f"  {'PSS growth per held client, listener (KB)':44s} {s['kb']:9.2f} | {t['kb']:9.1f} {vs(s['kb'], t['kb'], 'KB')} "
          f"| {w['kb']:9.0f} {vs(s['kb'], w['kb'], 'KB')} | {verdict(s['kb'] <= TARGET_KB)} (<= {TARGET_KB:g} KB)")
    if case == "tarpit":
        print(f"  {'  + its backend (KB PSS each), total':44s} {mem:9.1f} | {t['kb']:9.1f} {vs(mem, t['kb'], 'KB')} "
              f"| {w['kb']:9.0f} {vs(mem, w['kb'], 'KB')} |")
    print(f"  {'CPU while holding, % of one core':44s} {s['cpu']:9.2f} | {t['cpu']:9.2f} {vs(s['cpu'], t['cpu'], '% ')} "
          f"| {w['cpu']:9.2f} {vs(s['cpu'], w['cpu'], '% ')} | {verdict(s['cpu'] < TARGET_CPU)} (< {TARGET_CPU:g} %)")
    if case == "tarpit":
        print(f"  {'  (its backends, idle, all together)':44s} {s['backend_cpu']:9.2f} |")
    sm, tm, wm = (statistics.median(r["freed"]) if r["freed"] else float("nan") for r in (s, t, w))
    print(f"  {'close -> freed, median ms':44s} {sm:9.2f} | {tm:9.2f} {vs(sm, tm, 'ms')} | {wm:9.2f} {vs(sm, wm, 'ms')} "
          f"| {verdict(sm <= TARGET_CLOSE_MS)} (<= {TARGET_CLOSE_MS:g} ms)")
    sp, tp, wp = (pct(r["freed"], 0.99) for r in (s, t, w))
    print(f"  {'close -> freed, p99 ms':44s} {sp:9.2f} | {tp:9.2f} {vs(sp, tp, 'ms')} | {wp:9.2f} {vs(sp, wp, 'ms')} |")
    se, te, we = (statistics.median(r["ended"]) if r["ended"] else float("nan") for r in (s, t, w))
    print(f"  {'close -> `end` logged, median ms':44s} {se:9.2f} | {te:9.2f} {vs(se, te, 'ms')} | {we:9.2f} {vs(se, we, 'ms')} |")
    if case == "tarpit":
        print(f"  serve: close -> listener's fd closed median {statistics.median(s['fd_ms'] or [0]):.2f} ms, "
              f"-> backend reaped median {statistics.median(s['reap_ms'] or [0]):.2f} ms "
              f"p99 {pct(s['reap_ms'], 0.99):.2f} ms")
    print(f"  closes timed: serve {len(s['freed'])}, tcpserver {len(t['freed'])}, wrapper {len(w['freed'])}"
          f" (not seen freed within 5 s or not found: {s['close_missing']}/{t['close_missing']}/{w['close_missing']})")
    bad = []
    if s["connects"] != s["ends"]:
        bad.append(f"{s['connects'] - s['ends']} sessions without an `end` line 15 s after all clients closed")
    if s["fds_left"] > 0:
        bad.append(f"{s['fds_left']} more fds than before the clients came")
    if s["backends_left"]:
        bad.append(f"{s['backends_left']} backends still running")
    if s["errors"]:
        kinds: dict[str, int] = {}
        for e in s["errors"]:
            kinds[e] = kinds.get(e, 0) + 1
        bad.append("error lines in its log: " + "; ".join(f"{n} x {e!r}" for e, n in kinds.items()))
    for r in (s, t, w):
        if r["unexpected"] or r["failed"] or r["closed_by_server"]:
            bad.append(f"{r['kind']}: held clients were sent {r['unexpected']}, failed connects {r['failed']}, "
                       f"closed by the server {r['closed_by_server']}")
    print("  serve after all clients left: " + ("; ".join(bad) if bad else
          f"clean ({s['ends']} `end` lines for {s['connects']} connects, no fd or backend left, no error line)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", type=int, default=10000, help="clients held in the greet pause (default 10000)")
    ap.add_argument("--tarpit-k", type=int, default=2000, help="clients held in the RCPT tarpit (default 2000)")
    ap.add_argument("--base-k", type=int, default=1000, help="at most this many for tcpserver + mini_smtpd")
    ap.add_argument("--wrapper-k", type=int, default=40, help="clients for tcpserver + the wrapper (default 40)")
    ap.add_argument("--cpu-seconds", type=float, default=20.0)
    ap.add_argument("--closes", type=int, default=200, help="clients closed one at a time, per server")
    ap.add_argument("--only", choices=("greet", "tarpit"), help="one case only")
    ap.add_argument("--quick", action="store_true", help="K=1000 / 300, base 300, 5 s CPU, 50 closes")
    ap.add_argument("--wrapper", help="tarpit-smtpd to run (default: the one beside this Python)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) and print its path")
    args = ap.parse_args()
    if args.quick:
        args.k, args.tarpit_k, args.base_k, args.wrapper_k = 1000, 300, 300, 20
        args.cpu_seconds, args.closes = 5.0, 50
    for tool in ("tcpserver", "tcprules", "gcc"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian: {'gcc' if tool == 'gcc' else 'ucspi-tcp'})", file=sys.stderr)
            return 1
    wrapper = args.wrapper or str(Path(sys.executable).parent / "tarpit-smtpd")
    if not os.access(wrapper, os.X_OK):
        wrapper = shutil.which("tarpit-smtpd") or ""
    if not wrapper:
        print("tarpit-smtpd not installed for this Python (pip install -e .)", file=sys.stderr)
        return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # serve holds one fd per greet-paused client and two per tarpitted one; this process one each
    room = hard - 200
    notes = []
    if args.k + WARM > room:
        notes.append(f"RLIMIT_NOFILE hard limit {hard} is too low for K={args.k}: K cut to {room - WARM}")
        args.k = room - WARM
    if 2 * (args.tarpit_k + WARM) > room:
        notes.append(f"RLIMIT_NOFILE hard limit {hard} is too low for tarpit K={args.tarpit_k}: "
                     f"cut to {room // 2 - WARM}")
        args.tarpit_k = room // 2 - WARM
    work = Path(tempfile.mkdtemp(prefix="tarpit-serve-hold-"))
    try:
        mini = work / "mini_smtpd"
        subprocess.run(["gcc", "-O2", "-o", str(mini), str(HERE / "mini_smtpd.c")], check=True)
        (work / "control").mkdir()
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cpus; "
              f"loadavg at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {sys.version.split()[0]}; "
              f"RLIMIT_NOFILE {soft} -> {hard}; wrapper {wrapper}")
        for n in notes:
            print(f"# {n}")
        base = 0
        for case in ("greet", "tarpit"):
            if args.only and case != args.only:
                continue
            k = args.k if case == "greet" else args.tarpit_k
            rows = {}
            for kind, kk in (("serve", k), ("tcpserver", min(k, args.base_k)), ("wrapper", args.wrapper_k)):
                rows[kind] = measure(kind, case, kk, args, work, mini, wrapper, base)
                base += kk + WARM  # fresh source addresses: no TIME_WAIT left by the last server
            report(case, rows)
        print(f"\n# loadavg at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if args.keep:
            print(f"# logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
