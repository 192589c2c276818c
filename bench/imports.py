#!/usr/bin/env python3
"""What tarpit-smtpd imports per connection, and what each import costs: -X importtime, medians.

    python3 bench/imports.py [-n 15] [--paths fast,proxy,tarpit,tarpit-nogrey] [--top 20]

Each sample is one real wrapper process on a socketpair (fd 0 and 1), with the
environment tcpserver would give the client bench/run.py uses for that path,
in front of mini_smtpd (built here with gcc):

  fast           trusted (RELAYCLIENT=""): exec fast path; runs to the 220, then QUIT
  proxy          normal (TARPIT=0), badheloarg CDB present: proxy path; 220, then QUIT
  tarpit         suspicious, TARPIT=600, default taRgrey + SQLite store: EHLO, MAIL, RCPT,
                 held until event=tarpit_start, then the client closes
  tarpit-nogrey  the same with TARPIT_GREYLIST=off

Two ways of starting the same code:

  site     the console script as installed for this Python (site runs: every .pth
           of this site-packages, the editable finder, whatever else is there)
  -I -S    `python -I -S`, the working tree put on sys.path by hand (libtarpit and a
           tarpit_wrappers symlink): only the interpreter and the wrapper's own imports

Printed per path and mode: median wall ms from spawn to the 220 (separate runs
without -X importtime), USS/PSS of the wrapper once held in the tarpit, how many
modules were imported, which of the watched modules (ssl, typing, dataclasses,
asyncio, redis, ...) were, and the top imports by median cumulative time,
leaving out what `python -c pass` in the same mode imports already.
Bytecode is cached in the work directory (warm-up run first), as in bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
ENVS = {
    "fast": {"TCPREMOTEIP": "127.0.0.2", "TCPREMOTEHOST": "mail.example.com", "RELAYCLIENT": ""},
    "proxy": {"TCPREMOTEIP": "127.0.0.3", "TCPREMOTEHOST": "mail.example.com", "TARPIT": "0"},
    "tarpit": {"TCPREMOTEIP": "127.0.0.5", "TCPREMOTEHOST": DYNAMIC, "TARPIT": "600"},
    "tarpit-nogrey": {"TCPREMOTEIP": "127.0.0.4", "TCPREMOTEHOST": DYNAMIC, "TARPIT": "600",
                      "TARPIT_GREYLIST": "off"},
}
WATCH = ("ssl", "_ssl", "typing", "dataclasses", "asyncio", "redis", "certifi", "socket", "tempfile",
         "ipaddress", "inspect", "json", "sqlite3", "datetime", "enum", "re", "pathlib", "selectors")
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")
RUNNER = ("import sys; sys.path.insert(0, {tree!r})\n"
          "from tarpit_wrappers.tarpit_smtpd import entry; entry()\n")


def importtime(stderr: str) -> dict[str, tuple[int, int, int]]:
    """module -> (self us, cumulative us, depth) from -X importtime output."""
    out = {}
    for line in stderr.splitlines():
        m = LINE.match(line)
        if m:
            out[m[4]] = (int(m[1]), int(m[2]), len(m[3]) // 2)
    return out


def reply(sock: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def smaps(pid: int) -> tuple[float, float]:
    """(USS, PSS) of pid in MB."""
    f = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh.read().splitlines()[1:]:
            k, _, v = line.partition(":")
            f[k] = int(v.split()[0])
    return (f["Private_Clean"] + f["Private_Dirty"]) / 1024, f["Pss"] / 1024


SAMPLES = [0]


def one(argv: list[str], env: dict[str, str], path: str, mini: str):
    """Run one wrapper; return (ms to 220, stderr, (uss, pss) or None)."""
    if path.startswith("tarpit"):  # a first contact each time: a /24 of its own (else greylist_defer)
        SAMPLES[0] += 1
        env = dict(env, TCPREMOTEIP=f"10.{SAMPLES[0] // 256 % 256}.{SAMPLES[0] % 256}.5")
    a, b = socket.socketpair()
    t0 = time.perf_counter()
    p = subprocess.Popen([*argv, mini], stdin=b, stdout=b, stderr=subprocess.PIPE, env=env)
    b.close()
    a.settimeout(20)
    banner = reply(a)
    ms = (time.perf_counter() - t0) * 1e3
    if not banner.startswith(b"220"):
        p.kill()
        raise SystemExit(f"{path}: no 220 from {argv}: {banner!r}\n{p.stderr.read().decode()[-2000:]}")
    mem = None
    if path.startswith("tarpit"):
        for cmd in (b"EHLO client.example.org\r\n", b"MAIL FROM:<bench@example.org>\r\n"):
            a.sendall(cmd)
            reply(a)
        a.sendall(b"RCPT TO:<bob@example.com>\r\n")
        time.sleep(0.3)  # the wrapper is in its tarpit poll() by now (checked below)
        mem = smaps(p.pid)
    else:
        a.sendall(b"QUIT\r\n")
        reply(a)
    a.close()
    err = p.stderr.read().decode(errors="replace")
    p.wait()
    if path.startswith("tarpit") and "event=tarpit_start" not in err:
        raise SystemExit(f"{path}: no tarpit_start:\n{err[-2000:]}")
    if path == "fast" and "event=exec" not in err:
        raise SystemExit(f"fast: no exec:\n{err[-2000:]}")
    if path == "proxy" and "event=exec" in err:
        raise SystemExit(f"proxy: took the exec path:\n{err[-2000:]}")
    return ms, err, mem


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="processes per path, mode and kind of run (default 15)")
    ap.add_argument("--paths", default="fast,proxy,tarpit,tarpit-nogrey")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    scripts = sysconfig.get_path("scripts")
    wrapper, tarpitctl = shutil.which("tarpit-smtpd", path=scripts), shutil.which("tarpitctl", path=scripts)
    if not wrapper or not shutil.which("gcc"):
        print(f"needs gcc and tarpit-smtpd in {scripts} (pip install -e {REPO})", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="tarpit-imports.")
    try:
        mini = os.path.join(work, "mini_smtpd")
        subprocess.run(["gcc", "-O2", "-o", mini, os.path.join(HERE, "mini_smtpd.c")], check=True)
        control = os.path.join(work, "control")
        os.mkdir(control)
        with open(os.path.join(control, "badheloarg"), "w") as f:
            f.write("localhost\nlocalhost.localdomain\nexample.invalid\n")
        if tarpitctl:
            subprocess.run([tarpitctl, "cdb", os.path.join(control, "badheloarg")], capture_output=True)
        tree = os.path.join(work, "tree")
        os.mkdir(tree)
        os.symlink(os.path.join(REPO, "libtarpit"), os.path.join(tree, "libtarpit"))
        os.symlink(os.path.join(REPO, "wrappers"), os.path.join(tree, "tarpit_wrappers"))
        base = dict(os.environ, TARPIT_CONTROL=control, PYTHONPYCACHEPREFIX=os.path.join(work, "pycache"),
                    TCPLOCALIP="127.0.0.1", TCPLOCALPORT="25", TCPREMOTEPORT="40000")
        base.pop("PYTHONDONTWRITEBYTECODE", None)
        base.pop("TARPIT_CONFIG", None)
        py = sys.executable
        modes = {"site": [py, wrapper], "-I -S": [py, "-I", "-S", "-c", RUNNER.format(tree=tree)]}
        empty = {"site": [py, "-c", "pass"], "-I -S": [py, "-I", "-S", "-c", "pass"]}
        print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; loadavg {os.getloadavg()[0]:.2f}; Python "
              f"{sys.version.split()[0]} ({py}); wrapper {wrapper}; n={args.n}")
        for mode, argv in modes.items():
            startup = set(importtime(subprocess.run([*empty[mode][:1], "-X", "importtime", *empty[mode][1:]],
                                                    capture_output=True, text=True).stderr))
            print(f"\n#### mode {mode}: `python{' ' + mode if mode != 'site' else ''} -c pass` imports "
                  f"{len(startup)} modules; those are left out below")
            for path in args.paths.split(","):
                env = dict(base, **ENVS[path], TARPIT_GREYLIST_URL=os.path.join(work, f"grey-{mode[0]}.sqlite"))
                traced = [argv[0], "-X", "importtime", *argv[1:]]
                one(traced, env, path, mini)  # warm the bytecode cache
                walls, mems, runs = [], [], []
                for _ in range(args.n):  # interleave timed and traced runs
                    ms, _, mem = one(argv, env, path, mini)
                    walls.append(ms)
                    if mem:
                        mems.append(mem)
                    runs.append(importtime(one(traced, env, path, mini)[1]))
                report(mode, path, walls, mems, runs, startup, args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(mode, path, walls, mems, runs, startup, top):
    mods = set().union(*runs)
    med = {m: (statistics.median(r.get(m, (0, 0, 0))[0] for r in runs) / 1e3,
               statistics.median(r.get(m, (0, 0, 0))[1] for r in runs) / 1e3,
               min(r[m][2] for r in runs if m in r)) for m in mods}
    ours = {m: v for m, v in med.items() if m not in startup}
    line = f"\n== {path}, {mode}: spawn -> 220 median {statistics.median(walls):.1f} ms"
    if mems:
        line += (f"; held in the tarpit: USS {statistics.median(m[0] for m in mems):.2f} MB, "
                 f"PSS {statistics.median(m[1] for m in mems):.2f} MB (one process)")
    print(line)
    print(f"modules: {len(mods)} in all, {len(ours)} beyond `-c pass`; sum of their self times "
          f"{sum(v[0] for v in ours.values()):.1f} ms (median per module)")
    seen = [w for w in WATCH if w in mods]
    print(f"watched modules imported: {', '.join(seen) or 'none'};"
          f" not imported: {', '.join(w for w in WATCH if w not in mods)}")
    print(f"{'cumul ms':>8} {'self ms':>8}  module (indent = depth in the import tree)")
    for m, (s, c, d) in sorted(ours.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{c:8.2f} {s:8.2f}  {'  ' * d}{m}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
