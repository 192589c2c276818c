"""What a big rcptusers.cdb costs a connection: load + one lookup, against an empty list.

    python3 bench/cdb_lookup.py [--users 1000000] [--runs 41]

Builds rcptusers.cdb with 0 and with --users users (tarpitctl cdb's compile_cdb,
recording both as verified in a state directory, as `tarpitctl cdb` does), then
runs, each in a fresh interpreter, `ControlList.load(dir, "rcptusers",
cache_dir=...)` + one lookup, timing from just before `import libtarpit.control`
to just after the lookup, and reading the peak RSS (VmHWM) at the end.
Runs alternate between the two lists; the median of --runs is printed for each
with the difference and ratio against the empty list.

Cases:
  verified    cache_dir holds the file's verdict: the wrapper's usual case
  no cache    no cache_dir: header check only
  first       a fresh cache_dir: the one connection that runs the full check
              (one run each: it is a one-off)

Target: the big list within +2 ms of the empty one, and peak RSS within +1 MB.
Children run with a bytecode cache (PYTHONPYCACHEPREFIX in the work dir) like an
installed package, and the repository first on PYTHONPATH.  Exit 0 when the run
completed, whatever PASS/FAIL says.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_MS = 2.0
TARGET_MB = 1.0

# Peak RSS is VmHWM, which exec resets; ru_maxrss is not reset by exec on Linux,
# so a child of this (big, after compiling) process would report our peak.
CHILD = r"""
import sys, time
t0 = time.perf_counter()
from libtarpit.control import ControlList
lst = ControlList.load(sys.argv[1], "rcptusers", cache_dir=sys.argv[2] or None)
hit = "user12345@example.com" in lst
t1 = time.perf_counter()
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
print(f"{(t1 - t0) * 1000:.3f} {hwm / 1024:.2f} {hit}")
"""


def build(directory: str, users: int, state: str) -> float:
    """Write rcptusers and compile it to rcptusers.cdb (recorded in `state`); return seconds taken."""
    sys.path.insert(0, REPO)
    from libtarpit.control import compile_cdb

    os.makedirs(directory)
    src = os.path.join(directory, "rcptusers")
    with open(src, "w") as f:
        f.write("".join(f"user{i}@example.com\n" for i in range(users)))
    started = time.perf_counter()
    compile_cdb(src, cache_dir=state)
    return time.perf_counter() - started


def child(env: dict[str, str], directory: str, cache: str) -> tuple[float, float]:
    """Run one fresh interpreter; return (ms, peak RSS MB)."""
    out = subprocess.run([sys.executable, "-c", CHILD, directory, cache], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    ms, mb, _ = out.stdout.split()
    return float(ms), float(mb)


def row(label: str, base: tuple[float, float], big: tuple[float, float]) -> str:
    d_ms, d_mb = big[0] - base[0], big[1] - base[1]
    verdict = "PASS" if d_ms <= TARGET_MS and d_mb <= TARGET_MB else "FAIL"
    return (f"{label:<12}{base[0]:>9.2f}{big[0]:>9.2f}{d_ms:>+9.2f}{big[0] / base[0]:>7.2f}x"
            f"{base[1]:>10.1f}{big[1]:>9.1f}{d_mb:>+8.1f}  {verdict}")


def main() -> int:
    """Build the two lists, run the cases, print the table; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=41)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tarpit-cdb-bench-")
    try:
        state = os.path.join(work, "state")
        os.makedirs(state)
        empty, big = os.path.join(work, "empty"), os.path.join(work, "big")
        build(empty, 0, state)
        compile_s = build(big, args.users, state)
        size = os.path.getsize(os.path.join(big, "rcptusers.cdb"))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
        child(env, empty, state)  # warm the bytecode cache
        print(f"rcptusers.cdb: 0 and {args.users} users ({size / 1e6:.1f} MB); "
              f"compile + full check of the big one: {compile_s:.1f} s")
        print(f"median of {args.runs} fresh interpreters: import control + load + one lookup\n")
        print(f"{'case':<12}{'empty ms':>9}{'big ms':>9}{'diff':>9}{'ratio':>8}"
              f"{'empty MB':>10}{'big MB':>9}{'diff':>8}")
        for label, cache in (("verified", state), ("no cache", "")):
            runs: dict[str, list[tuple[float, float]]] = {empty: [], big: []}
            for _ in range(args.runs):
                for directory in (empty, big):
                    runs[directory].append(child(env, directory, cache))
            medians = {d: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                       for d, v in runs.items()}
            print(row(label, medians[empty], medians[big]))
        firsts = []
        for directory in (empty, big):
            fresh = tempfile.mkdtemp(dir=work)
            firsts.append(child(env, directory, fresh))
        print(row("first", firsts[0], firsts[1]).rsplit("  ", 1)[0] + "  (once per new file: not a target)")
        print(f"\ntarget: within +{TARGET_MS:g} ms and +{TARGET_MB:g} MB of the empty list")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
