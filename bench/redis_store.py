"""What the greylist store costs one connection: SQLite against Redis, measured in the same run.

    python3 bench/redis_store.py [-n 40] [--redis-server /usr/bin/redis-server]

Each sample is a fresh Python process doing what one wrapper process does with the store:
import libtarpit.greylist, open the store, Greylist.check one triple, record one event,
then leave with os._exit (the wrapper does not run interpreter shutdown either).  Two cases:

  white   a whitelisted client: check -> pass whitelisted, then delivered (DEL + one Lua call)
  first   a first contact (a new client each time): check -> tarpit, then tarpit_lost (two Lua calls)

Stores, one sample of each in turn so machine noise hits all alike:

  sqlite     a SQLite file in the work directory
  redis      redis://127.0.0.1:PORT (our RESP client on _socket)
  unix       unix:///.../redis.sock?db=2 (the same, over a unix socket)
  redis-py   redis://127.0.0.1:PORT/1 through redis-py, as rediss:// goes (the store before)

A real redis-server is started on a free loopback port and a unix socket, with no
persistence, and stopped at the end.  Printed per store and case: the median over N of
the time inside the process from before `import libtarpit.greylist` to the end (ms), the
median wall time of the whole process (fork, exec, interpreter start included), and the
difference and ratio against SQLite.  Exit status 1 when redis-server is missing.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
url, case, n, via = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
from libtarpit import greylist as gl
if via == "redis-py":
    from libtarpit import greystore
    greystore._REDIS_PY_SCHEMES = ("redis://",)
g = gl.Greylist(gl.open_store(url, timeout=2.0), gl.GreylistParams())
now = time.time()
if case == "white":
    d = g.check("192.0.2.0/24", "alice@example.org", "bob@example.jp", now)
    assert d.reason == "whitelisted", d
    g.delivered("192.0.2.0/24", now)
else:
    client = f"10.{n // 256 % 256}.{n % 256}.0/24"
    d = g.check(client, "alice@example.org", "bob@example.jp", now)
    assert d.action == "tarpit", d
    g.tarpit_lost(client, "alice@example.org", "bob@example.jp", now)
sys.stdout.write("%.3f\n" % ((time.perf_counter() - t0) * 1000))
sys.stdout.flush()
import os
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(binary: str, work: str) -> tuple[subprocess.Popen, int, str]:
    port, sock = free_port(), os.path.join(work, "redis.sock")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", sock, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc, port, sock
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("redis-server did not start")
        time.sleep(0.05)


def sample(url: str, case: str, n: int, via: str) -> tuple[float, float]:
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, ROOT, url, case, str(n), via],
                         capture_output=True, text=True, timeout=60, cwd="/")
    wall = (time.perf_counter() - began) * 1000
    if out.returncode != 0:
        sys.exit(f"child failed ({url}, {case}, {via}):\n{out.stderr}")
    return float(out.stdout), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=40, help="processes per store and case (default 40)")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    args = ap.parse_args()
    if not os.path.exists(args.redis_server):
        print("redis-server not found (Debian package redis-server)", file=sys.stderr)
        return 1
    sys.path.insert(0, ROOT)
    from libtarpit import greylist as gl

    work = tempfile.mkdtemp(prefix="tarpit-redis-bench.")
    proc, port, sock = start_redis(args.redis_server, work)
    try:
        stores = {
            "sqlite": (os.path.join(work, "greylist.sqlite"), "own"),
            "redis": (f"redis://127.0.0.1:{port}/0", "own"),
            "unix": (f"unix://{sock}?db=2", "own"),
            "redis-py": (f"redis://127.0.0.1:{port}/1", "redis-py"),
        }
        for url, _ in stores.values():  # the whitelisted client, and the SQLite schema, exist beforehand
            gl.Greylist(gl.open_store(url, timeout=2.0), gl.GreylistParams()).whitelist_add(
                "192.0.2.0/24", 86400, time.time())
        results = {(name, case): ([], []) for name in stores for case in ("white", "first")}
        for i in range(args.n):
            for case in ("white", "first"):
                for name, (url, via) in stores.items():
                    inner, wall = sample(url, case, i, via)
                    results[name, case][0].append(inner)
                    results[name, case][1].append(wall)
        print(f"per connection, median of {args.n} fresh processes each (ms); "
              "in-process = import libtarpit.greylist + open + check + one event")
        print(f"{'case':6} {'store':9} {'in-process':>10} {'vs sqlite':>10} {'ratio':>6} {'wall':>8} {'vs sqlite':>10}")
        for case in ("white", "first"):
            base_in = statistics.median(results["sqlite", case][0])
            base_wall = statistics.median(results["sqlite", case][1])
            for name in stores:
                inner = statistics.median(results[name, case][0])
                wall = statistics.median(results[name, case][1])
                print(f"{case:6} {name:9} {inner:10.1f} {inner - base_in:+10.1f} {inner / base_in:6.2f} "
                      f"{wall:8.1f} {wall - base_wall:+10.1f}")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
