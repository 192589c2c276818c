"""Connect -> 220 through `tarpit-smtpd serve`, against tcpserver + the backend alone, in one run.

    python3 bench/serve_latency.py [-n 200]

Backend: bench/mini_smtpd.c (built here).  Four servers on loopback, each connection
timed from connect() to the first banner line, then QUIT; cases interleaved so load
drift hits them alike; medians and p90 in ms:
  (a) tcpserver + backend          the baseline
  (b) serve, trusted client        exec fast path: the backend gets the socket
  (c) serve, normal client         proxy path (a badheloarg list is present)
  (d) tcpserver + tarpit-smtpd     the wrapper's fast path, for comparison
Issue 12's targets: (b) <= +2 ms, (c) <= +3 ms over (a).  Not run by pytest.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 10
    while b"status: 0/" not in log.read_bytes():
        if time.monotonic() > deadline:
            raise SystemExit(f"{argv[0]} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)
    return proc


def once(port: int) -> float:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.recv(512)
        dt = time.perf_counter() - t
        s.sendall(b"QUIT\r\n")
        s.recv(512)
    return dt * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200)
    n = ap.parse_args().n
    work = Path(tempfile.mkdtemp(prefix="tarpit-serve-lat-"))
    procs = []
    try:
        mini = work / "mini_smtpd"
        subprocess.run(["gcc", "-O2", "-o", str(mini), str(HERE / "mini_smtpd.c")], check=True)
        (work / "control").mkdir()
        (work / "control" / "badheloarg").write_text("localhost\n")
        env = dict(os.environ, TARPIT_CONTROL=str(work / "control"), TARPIT_STATE_DIR=str(work),
                   TCPREMOTEHOST="mail.example.com")
        wrapper = shutil.which("tarpit-smtpd")
        ports = {k: free_port() for k in "abcd"}
        procs.append(start(["tcpserver", "-vRHl0", "127.0.0.1", str(ports["a"]), str(mini)], env, work / "a.log"))
        procs.append(start([wrapper, "serve", "-vRHl0", "127.0.0.1", str(ports["b"]), str(mini)],
                           {**env, "RELAYCLIENT": ""}, work / "b.log"))
        procs.append(start([wrapper, "serve", "-vRHl0", "127.0.0.1", str(ports["c"]), str(mini)], env, work / "c.log"))
        procs.append(start(["tcpserver", "-vRHl0", "127.0.0.1", str(ports["d"]), wrapper, str(mini)],
                           {**env, "RELAYCLIENT": ""}, work / "d.log"))
        times: dict[str, list[float]] = {k: [] for k in ports}
        for i in range(n + 5):
            for k, port in ports.items():
                dt = once(port)
                if i >= 5:
                    times[k].append(dt)
        base = statistics.median(times["a"])
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; loadavg {os.getloadavg()[0]:.1f}; "
              f"wrapper {wrapper}; n={n}")
        names = {"a": "tcpserver + backend alone", "b": "serve, trusted: exec fast path",
                 "c": "serve, normal: proxy path", "d": "tcpserver + tarpit-smtpd, exec fast path"}
        targets = {"b": 2.0, "c": 3.0}
        for k, label in names.items():
            ts = sorted(times[k])
            med, p90 = statistics.median(ts), ts[int(0.9 * len(ts)) - 1]
            extra = "" if k == "a" else f"  {med - base:+7.2f} ms over (a)"
            if k in targets:
                extra += f"  {'PASS' if med - base <= targets[k] else 'FAIL'} (target +{targets[k]:g} ms)"
            print(f"({k}) {label:42s} median {med:7.2f}  p90 {p90:7.2f}{extra}")
        assert "event=exec" in (work / "b.log").read_text() and "event=exec" not in (work / "c.log").read_text()
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
