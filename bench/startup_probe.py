"""Where the wrapper's start-up time goes: run by bench/run.py under a given Python.

    python bench/startup_probe.py fast|proxy|tarpit [--memory]
    python bench/startup_probe.py fast|proxy|tarpit --list

The environment must look like tcpserver's for the client wanted: `fast` is a
trusted client (RELAYCLIENT set), `proxy` a normal one with a badheloarg list
in TARPIT_CONTROL, `tarpit` a suspicious one with the default taRgrey and a
SQLite TARPIT_GREYLIST_URL (run up to the backend's spawn, the store opened).  The probe runs tarpit_wrappers.tarpit_smtpd.main() up to
the moment it would exec the backend (fast) or spawn it (proxy), with that
one call replaced.

--list     print the modules main() imported on the way, in import order.
default    learn that list from a child run, then import the same modules one
           step at a time (stdlib groups first, then third-party and project
           modules in import order), then run main(); print `label<TAB>ms`
           per step: each step's cost given the steps before it.
--memory   the same steps, printing `label<TAB>MB` of private memory (USS,
           /proc/self/smaps_rollup) each step added.
Only modules the wrapper really imports are stepped through, so a module the
wrapper stops importing drops out of the table.  The probe leaves with
os._exit, so interpreter shutdown is not part of anything measured.
"""

import os
import sys
import time

# Nothing else is imported here: a module this script imported itself (subprocess pulls in
# signal, re, enum, selectors, ...) would be missing from the wrapper's list and read 0 ms.

# stdlib groups worth naming, keyed by the module that pulls the rest in
STDLIB = [
    ("enum", "stdlib enum (signal, re need it)"),
    ("signal", "stdlib signal"),
    ("socket", "stdlib socket"),
    ("re", "stdlib re"),
    ("typing", "stdlib typing"),
    ("dataclasses", "stdlib dataclasses (inspect, ast, dis, tokenize)"),
    ("tempfile", "stdlib tempfile (shutil, random, bz2, lzma)"),
    ("ipaddress", "stdlib ipaddress"),
    ("tomllib", "stdlib tomllib"),
    ("sqlite3", "stdlib sqlite3"),
    ("datetime", "stdlib datetime"),
]
OURS = ("libtarpit", "tarpit_wrappers", "cdblib")


class _Reached(BaseException):
    """Raised in place of exec / backend spawn: main() got that far."""


def _reached(*args, **kwargs):
    raise _Reached()


def run_main() -> bool:
    """Run the wrapper's main() up to exec or spawn; True when it got there."""
    from tarpit_wrappers import tarpit_smtpd

    os.execvp = _reached
    tarpit_smtpd.Backend = _reached
    try:
        tarpit_smtpd.main(["/bin/true"])
    except _Reached:
        return True
    return False


def list_modules() -> None:
    before = set(sys.modules)
    ok = run_main()
    if not ok:
        sys.stderr.write("startup_probe: main() reached neither exec nor spawn: check the environment\n")
        os._exit(1)
    sys.stdout.write("".join(m + "\n" for m in sys.modules if m not in before))
    sys.stdout.flush()
    os._exit(0)


def uss() -> float:
    """Private memory of this process, in MB / 1000 so the one formatter (x 1000) prints MB."""
    with open("/proc/self/smaps_rollup") as f:
        kb = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty")))
    return kb / 1024 / 1000


def steps(path: str) -> list[tuple[str, str]]:
    """(label, module) for every step, from a child run's --list."""
    r, w = os.pipe()
    pid = os.fork()  # not subprocess: see the imports above
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.execv(sys.executable, [sys.executable, __file__, path, "--list"])
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        os._exit(1)
    needed = b"".join(chunks).decode().split()
    todo = [(label, mod) for mod, label in STDLIB if mod in needed]
    todo += [(mod, mod) for mod in needed if mod.split(".")[0] in OURS]
    return todo


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "fast"
    if "--list" in sys.argv:
        list_modules()
    measure = uss if "--memory" in sys.argv else time.perf_counter
    out = []
    for label, mod in steps(path):
        t0 = measure()
        __import__(mod)
        out.append((label, measure() - t0))
    t0 = measure()
    run_main()
    what = "exec" if path == "fast" else "spawn"
    out.append((f"main() up to {what} (modules loaded)", measure() - t0))
    sys.stdout.write("".join(f"{label}\t{value * 1e3:.3f}\n" for label, value in out))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
