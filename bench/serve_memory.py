"""Memory per held client: `tarpit-smtpd serve` against one wrapper process per client.

    python3 bench/serve_memory.py [-k 500]

Starts `tarpit-smtpd serve` on loopback in front of bench/mini_smtpd.c (built here), walks
K suspicious clients to RCPT so each sits in a TARPIT=600 tarpit (taRgrey off, then on),
and reads the listener's PSS from /proc/PID/smaps_rollup before and after.  Prints the
growth per held client beside issue 12's peers (postscreen 1.3 KB, Haraka 4-11 KB, a bare
asyncio Protocol server 2.7 KB, streams 5.4 KB) and the wrapper mode's per-process figure
measured by bench/run.py.  The backends (one mini_smtpd per proxied client, as with
tcpserver) are reported apart.  Not run by pytest.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, ValueError):
                pass
    return out


def count(log: Path, word: str) -> int:
    return log.read_text(errors="replace").count(word)


def run(k: int, greylist: str, work: Path, mini: Path) -> tuple[float, float]:
    (work / "control").mkdir(exist_ok=True)
    state = work / f"state-{greylist}"
    state.mkdir()
    log = work / f"serve-{greylist}.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TCPREMOTEHOST="p1234-ipbf56abcdef.tokyo.ocn.ne.jp", TARPIT="600",
               TARPIT_GREYLIST=greylist, TARPIT_CONTROL=str(work / "control"), TARPIT_STATE_DIR=str(state),
               TARPIT_GREYLIST_URL=str(state / "greylist.sqlite"), TARPIT_CLASS="suspicious")
    proc = subprocess.Popen([shutil.which("tarpit-smtpd"), "serve", "-vRHl0", "-c", str(k + 50), "-b", "512",
                             "127.0.0.1", str(port), str(mini)], stderr=open(log, "wb"), env=env,
                            start_new_session=True)
    try:
        while "status: 0/" not in log.read_text(errors="replace"):
            time.sleep(0.05)
        socks = []

        def hold(n: int) -> None:
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.recv(100)
                s.sendall(b"HELO bot.example\r\n")
                s.recv(100)
                s.sendall(b"MAIL FROM:<x@example.org>\r\n")
                s.recv(100)
                s.sendall(b"RCPT TO:<bob@example.com>\r\n")
                socks.append(s)
            want = len(socks)
            while count(log, "event=tarpit_start") < want:
                time.sleep(0.05)

        hold(20)  # warm up: imports, the store, the first allocations
        time.sleep(0.5)
        before = pss_kb(proc.pid)
        hold(k)
        time.sleep(0.5)
        after = pss_kb(proc.pid)
        backends = [pss_kb(c) for c in children(proc.pid)]
        for s in socks:
            s.close()
        return (after - before) / k, sum(backends) / max(1, len(backends))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", type=int, default=500, help="clients held (default 500)")
    k = ap.parse_args().k
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="tarpit-serve-bench-"))
    try:
        mini = work / "mini_smtpd"
        subprocess.run(["gcc", "-O2", "-o", str(mini), str(HERE / "mini_smtpd.c")], check=True)
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cpus; "
              f"loadavg {os.getloadavg()[0]:.1f}; Python {sys.version.split()[0]}; K={k}")
        for greylist in ("off", "targrey"):
            per, backend = run(k, greylist, work, mini)
            print(f"greylist {greylist:8s} listener PSS growth per held client: {per:7.1f} KB"
                  f"   (each client's mini_smtpd backend: {backend:.0f} KB PSS, a process either way)")
        print("peers (issue 12): postscreen 1.3 KB, Haraka 4-11 KB, asyncio Protocol 2.7 KB, asyncio streams 5.4 KB;"
              " wrapper mode: one Python process per held client (bench/run.py section 2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
