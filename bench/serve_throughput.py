"""Bytes and messages through `tarpit-smtpd serve`, against tcpserver + the backend alone, in one run.

    python3 bench/serve_throughput.py              # ~3 min
    python3 bench/serve_throughput.py --quick      # < 1 min: one round, fewer messages
    python3 bench/serve_throughput.py --cache /tmp/tarpit-bench-cache --rounds 5

(a) 50 MB DATA relayed on the proxy path: one client sends HELO, MAIL, RCPT, DATA, then a
    50 MB body (76-byte CRLF lines, every 50th starting with a dot, so dot-stuffed) and
    the final dot; timed from the first body byte to the 250.  Backend: bench/mini_smtpd.c
    (built here; it reads the body in 8 KB blocks and discards it).  Servers:
      direct         tcpserver + mini_smtpd                               the baseline
      serve proxy    tarpit-smtpd serve + mini_smtpd, normal client, a badheloarg list
                     in the control directory, so it takes the proxy path
      wrapper proxy  tcpserver + tarpit-smtpd + mini_smtpd, the same client (for comparison)
    One 100 KB message to each first, not counted.  Median of --data-runs, as MB/s
    and as a ratio to direct.  Issue 12's target: >= 0.95x.

(b) Messages per second, one message per connection, 10 in parallel: Postfix's
    `smtp-source -s 10 -m M` (no -d, so it disconnects after each message) against
      qmail alone      tcpserver + qmail-smtpd                             the baseline
      wrapper fast     tcpserver + tarpit-smtpd + qmail-smtpd, trusted client (exec)
      wrapper proxy    the same, normal client with a badheloarg list (proxy)
      serve fast       tarpit-smtpd serve + qmail-smtpd, trusted client (exec)
      serve proxy      the same, normal client with a badheloarg list (proxy)
    qmail-smtpd is the real one, built from the vendored notqmail source by
    tests/qmail_backend.py (imported, cached under --cache); it hands each message to a
    C stand-in for qmail-queue (written and compiled here) that reads the message and
    the envelope and exits 0, so the queue's disk is not what is measured.  "trusted"
    is RELAYCLIENT="" from the tcprules CDB, "normal" TCPREMOTEHOST=mail.example.com;
    the baseline gets the trusted rule too (qmail-smtpd then skips rcpthosts, as under
    the fast path).  The cases are interleaved over --rounds; the wrapper cases send
    fewer messages (--wrapper-m) because each costs an interpreter start.
    Also the listener's own CPU per connection (tcpserver's for qmail alone), from
    /proc/PID/stat: steadier than messages/s on a shared machine.
    Issue 12's targets: serve fast >= 0.8x and serve proxy >= 0.5x of qmail alone.

smtp-source comes from Debian's `postfix` package, unpacked without installing an MTA
(`apt-get download postfix` and `dpkg -x` into --cache); if apt cannot download it the run
says so and exits 1, as it does when tcpserver, tcprules, gcc or make is missing.
Exit 0 means the run completed, whatever PASS/FAIL says.  Not run by pytest.
"""

from __future__ import annotations

import argparse
import os
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
from serve_hold import cpu_ticks
from serve_latency import free_port, start

TARGET_DATA = 0.95
TARGET_MSGS = {"serve fast": 0.8, "serve proxy": 0.5}
TRUSTED = '127.0.0.1:allow,TCPREMOTEHOST="mail.example.com",RELAYCLIENT=""\n'
NORMAL = '127.0.0.1:allow,TCPREMOTEHOST="mail.example.com"\n'

# qmail-queue's stand-in: the message on fd 0, then the envelope on fd 1, both to EOF; exit 0
QUEUE_C = r"""
#include <unistd.h>
int main(void)
{
    static char buf[65536];
    int fd;
    for (fd = 0; fd <= 1; fd++)
        for (;;) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n == 0)
                break;
            if (n < 0)
                return 54; /* qmail-queue: "unable to read the message or envelope" */
        }
    return 0;
}
"""


# --- tools ----------------------------------------------------------------------

def smtp_source(cache: Path) -> list[str] | None:
    """argv prefix running smtp-source from Debian's postfix package unpacked in `cache`; None if
    apt cannot download it (the reason is printed)."""
    root = cache / "postfix-root"
    binary = root / "usr" / "sbin" / "smtp-source"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        debs = sorted(cache.glob("postfix_*.deb"))
        if not debs:
            done = subprocess.run(["apt-get", "download", "postfix"], check=False, cwd=cache, capture_output=True, text=True)
            debs = sorted(cache.glob("postfix_*.deb"))
            if done.returncode != 0 or not debs:
                print(f"apt-get download postfix failed (exit {done.returncode}):\n{done.stderr.strip()}\n"
                      "smtp-source comes from Debian's postfix package; try `apt-get update` first", file=sys.stderr)
                return None
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
    return ["env", f"LD_LIBRARY_PATH={root / 'usr' / 'lib' / 'postfix'}", str(binary)]


def qmail(cache: Path) -> tuple[Path, Path]:
    """(qmail-smtpd, qmail-queue stand-in), built once into `cache` by tests/qmail_backend.build."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import pytest
    import qmail_backend

    base = cache / "qmail"
    binary = base / "root" / "qmail-smtpd"
    if not binary.exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        try:
            qmail_backend.build(base)
        except (pytest.skip.Exception, pytest.fail.Exception) as e:  # its way of saying what is missing
            raise SystemExit(f"cannot build qmail-smtpd: {e}")
    queue = cache / "qmail-queue-discard"
    if not queue.exists():
        (cache / "qmail-queue-discard.c").write_text(QUEUE_C)
        subprocess.run(["gcc", "-O2", "-o", str(queue), str(cache / "qmail-queue-discard.c")], check=True)
    return binary, queue


def rules(work: Path, name: str, text: str) -> Path:
    """tcprules CDB `name`.cdb from `text` (everything else: allow)."""
    (work / f"{name}.txt").write_text(text + ":allow\n")
    with open(work / f"{name}.txt") as f:
        subprocess.run(["tcprules", str(work / f"{name}.cdb"), str(work / f"{name}.tmp")], stdin=f, check=True)
    return work / f"{name}.cdb"


# --- (a) one big message -------------------------------------------------------------

def body(mb: int) -> bytes:
    """`mb` MB of CRLF lines of 76 bytes; every 50th line starts with '.', sent stuffed as '..'."""
    lines = []
    for i in range(50):
        lines.append((b".." if i == 0 else b"") + (b"%02d" % i) * 38 + b"\r\n")
    block = b"".join(lines)
    return block * (mb * 1024 * 1024 // len(block))


def reply(sock: socket.socket) -> bytes:
    buf = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return buf
        buf += data
        for ln in buf.split(b"\r\n")[:-1]:
            if ln[3:4] == b" ":
                return buf


def send_message(port: int, data: bytes) -> float:
    """One message of `data` to 127.0.0.1:`port`; seconds from its first byte to the 250."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        for cmd, code in ((None, b"220"), (b"HELO client.example.net\r\n", b"250"),
                          (b"MAIL FROM:<sender@example.org>\r\n", b"250"),
                          (b"RCPT TO:<rcpt@example.com>\r\n", b"250"), (b"DATA\r\n", b"354")):
            if cmd:
                s.sendall(cmd)
            r = reply(s)
            if not r.startswith(code):
                raise SystemExit(f"expected {code!r} after {cmd!r}, got {r!r}")
        t = time.perf_counter()
        s.sendall(data)
        s.sendall(b".\r\n")
        r = reply(s)
        dt = time.perf_counter() - t
        if not r.startswith(b"250"):
            raise SystemExit(f"expected 250 after the message, got {r!r}")
        s.sendall(b"QUIT\r\n")
        reply(s)
    return dt


# --- (b) messages per second ------------------------------------------------------------

def msgs_per_second(source: list[str], port: int, m: int) -> float:
    """smtp-source -s 10 -m `m` against `port`: messages per second (SystemExit if it failed)."""
    t = time.perf_counter()
    done = subprocess.run([*source, "-s", "10", "-m", str(m), "-f", "sender@example.org", "-t", "rcpt@example.com",
                           "-M", "client.example.net", f"127.0.0.1:{port}"], check=False, capture_output=True, text=True,
                          timeout=600)
    dt = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"smtp-source against port {port} failed ({done.returncode}): {done.stderr[-500:]}")
    return m / dt


# --- report ------------------------------------------------------------------------------

def line(label: str, value: float, base: float, unit: str, target: float | None) -> str:
    ratio = value / base
    verdict = "" if target is None else f"  {'PASS' if ratio >= target else 'FAIL'} (target >= {target:g}x)"
    return f"  {label:16s} {value:9.1f} {unit}   {value - base:+9.1f} {unit}   x{ratio:.3f}{verdict}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/tarpit-bench-cache", help="where smtp-source and qmail-smtpd are kept")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of smtp-source (default 3)")
    ap.add_argument("-m", type=int, default=1000, help="messages per smtp-source run (default 1000)")
    ap.add_argument("--wrapper-m", type=int, default=300, help="messages per run for the wrapper cases")
    ap.add_argument("--mb", type=int, default=50, help="size of the big message (default 50 MB)")
    ap.add_argument("--data-runs", type=int, default=3)
    ap.add_argument("--only", choices=("data", "msgs"))
    ap.add_argument("--quick", action="store_true", help="one round, -m 300, wrapper 60, one 50 MB run")
    ap.add_argument("--wrapper", help="tarpit-smtpd to run (default: the one beside this Python)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) and print its path")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.m, args.wrapper_m, args.data_runs = 1, 300, 60, 1
    for tool in ("tcpserver", "tcprules", "gcc", "make"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian: {'ucspi-tcp' if tool.startswith('tcp') else 'build-essential'})",
                  file=sys.stderr)
            return 1
    wrapper = args.wrapper or str(Path(sys.executable).parent / "tarpit-smtpd")
    if not os.access(wrapper, os.X_OK):
        wrapper = shutil.which("tarpit-smtpd") or ""
    if not wrapper:
        print("tarpit-smtpd not installed for this Python (pip install -e .)", file=sys.stderr)
        return 1
    cache = Path(args.cache)
    source = smtp_source(cache) if args.only != "data" else []
    if source is None:
        return 1
    work = Path(tempfile.mkdtemp(prefix="tarpit-serve-tput-"))
    procs: list[subprocess.Popen] = []
    try:
        mini = work / "mini_smtpd"
        subprocess.run(["gcc", "-O2", "-o", str(mini), str(HERE / "mini_smtpd.c")], check=True)
        plain, lists = work / "control", work / "control-badheloarg"
        plain.mkdir()
        lists.mkdir()
        (lists / "badheloarg").write_text("localhost\n")  # any list: a normal client then proxies
        env = dict(os.environ, TARPIT_STATE_DIR=str(work), TARPIT_GREYLIST_URL=str(work / "greylist.sqlite"))
        env.pop("TARPIT_CONFIG", None)
        trusted, normal = rules(work, "trusted", TRUSTED), rules(work, "normal", NORMAL)

        def server(name: str, kind: str, cdb: Path, control: Path, backend: list[str], extra: dict) -> int:
            port = free_port()
            opts = ["-vRHl0", "-c", "100", "-b", "100", "-x", str(cdb), "127.0.0.1", str(port)]
            argv = {"tcpserver": ["tcpserver", *opts, *backend], "wrapper": ["tcpserver", *opts, wrapper, *backend],
                    "serve": [wrapper, "serve", *opts, *backend]}[kind]
            procs.append(start(argv, {**env, "TARPIT_CONTROL": str(control), **extra}, work / f"{name}.log"))
            return port

        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cpus; "
              f"loadavg at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {sys.version.split()[0]}; "
              f"wrapper {wrapper}")
        if args.only != "msgs":
            ports = {"direct": server("data-direct", "tcpserver", normal, lists, [str(mini)], {}),
                     "serve proxy": server("data-serve", "serve", normal, lists, [str(mini)], {}),
                     "wrapper proxy": server("data-wrapper", "wrapper", normal, lists, [str(mini)], {})}
            data = body(args.mb)
            for port in ports.values():  # warm up, as for (b)
                send_message(port, data[:data.index(b"\r\n", 100000) + 2])
            times: dict[str, list[float]] = {k: [] for k in ports}
            for _ in range(args.data_runs):
                for k, port in ports.items():
                    times[k].append(send_message(port, data))
            mb = len(data) / 1e6
            rate = {k: mb / statistics.median(v) for k, v in times.items()}
            print(f"\n(a) one {mb:.1f} MB message (dot-stuffed CRLF lines) to mini_smtpd, median of {args.data_runs}, "
                  f"MB/s from the first body byte to the 250; difference and ratio to direct:")
            print(f"  {'direct':16s} {rate['direct']:9.1f} MB/s   ({statistics.median(times['direct']) * 1000:.0f} ms)")
            for k in ("serve proxy", "wrapper proxy"):
                print(line(k, rate[k], rate["direct"], "MB/s", TARGET_DATA if k.startswith("serve") else None)
                      + f"   ({statistics.median(times[k]) * 1000:.0f} ms)")
            for k, name in (("serve proxy", "data-serve"), ("wrapper proxy", "data-wrapper")):
                if "event=exec" in (work / f"{name}.log").read_text(errors="replace"):
                    print(f"  note: {k} logged exec: it did not take the proxy path")
        if args.only != "data":
            qsmtpd, queue = qmail(cache)
            q = {"QMAILQUEUE": str(queue)}
            ports = {"qmail alone": server("qmail", "tcpserver", trusted, plain, [str(qsmtpd)], q),
                     "wrapper fast": server("wrapper-fast", "wrapper", trusted, plain, [str(qsmtpd)], q),
                     "wrapper proxy": server("wrapper-proxy", "wrapper", normal, lists, [str(qsmtpd)], q),
                     "serve fast": server("serve-fast", "serve", trusted, plain, [str(qsmtpd)], q),
                     "serve proxy": server("serve-proxy", "serve", normal, lists, [str(qsmtpd)], q)}
            for port in ports.values():  # warm up: serve imports its modules at its first clients
                msgs_per_second(source, port, 20)
            pids = dict(zip(ports, (p.pid for p in procs[-len(ports):])))
            rates: dict[str, list[float]] = {k: [] for k in ports}
            cpu: dict[str, list[float]] = {k: [] for k in ports}  # ms of the listener's own CPU per message
            tick = 1000.0 / os.sysconf("SC_CLK_TCK")
            for _ in range(args.rounds):
                for k, port in ports.items():
                    m = args.wrapper_m if k.startswith("wrapper") else args.m
                    c0 = cpu_ticks([pids[k]])
                    rates[k].append(msgs_per_second(source, port, m))
                    cpu[k].append((cpu_ticks([pids[k]]) - c0) * tick / m)
            med = {k: statistics.median(v) for k, v in rates.items()}
            print(f"\n(b) messages/s, smtp-source -s 10 -m {args.m} (wrapper cases -m {args.wrapper_m}), one message "
                  f"per connection, real qmail-smtpd + discarding qmail-queue, median of {args.rounds} interleaved "
                  f"rounds; difference and ratio to qmail alone:")
            print(f"  {'qmail alone':16s} {med['qmail alone']:9.1f} msg/s  (rounds: "
                  f"{', '.join(f'{r:.0f}' for r in rates['qmail alone'])})")
            for k in ("serve fast", "serve proxy", "wrapper fast", "wrapper proxy"):
                paired = ", ".join(f"x{r / b:.2f}" for r, b in zip(rates[k], rates["qmail alone"]))
                print(line(k, med[k], med["qmail alone"], "msg/s", TARGET_MSGS.get(k))
                      + f"  (rounds: {', '.join(f'{r:.0f}' for r in rates[k])}; each against its round's qmail: {paired})")
            cpus = {k: statistics.median(cpu[k]) for k in ("qmail alone", "serve fast", "serve proxy")}
            print(f"  listener's own CPU per connection (utime+stime, not its children): tcpserver "
                  f"{cpus['qmail alone']:.2f} ms, serve fast {cpus['serve fast']:.2f} ms "
                  f"({cpus['serve fast'] - cpus['qmail alone']:+.2f}), serve proxy {cpus['serve proxy']:.2f} ms "
                  f"({cpus['serve proxy'] - cpus['qmail alone']:+.2f}); on a busy machine the one listener "
                  "process gets one share of the CPU, where qmail-smtpd's work is spread over many")
            logs = {k: (work / f"{n}.log").read_text(errors="replace") for k, n in
                    (("serve fast", "serve-fast"), ("serve proxy", "serve-proxy"), ("wrapper fast", "wrapper-fast"),
                     ("wrapper proxy", "wrapper-proxy"))}
            for k, text in logs.items():
                execs = text.count("event=exec")
                if k.endswith("fast") and execs == 0 or k.endswith("proxy") and execs:
                    print(f"  note: {k}: {execs} exec lines: not the path it is named after")
                errors = [ln for ln in text.splitlines() if "event=error" in ln or "serve: error" in ln]
                if errors:
                    print(f"  note: {k}: {len(errors)} error lines, e.g. {errors[0][:200]}")
        print(f"\n# loadavg at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
            p.wait()
        if args.keep:
            print(f"# logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
