"""libtarpit.slots: per-IP connection slots held by byte-range locks, released when a process dies."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from libtarpit.slots import acquire

HOLD = """
import signal, sys
from libtarpit.slots import acquire
fd = acquire(sys.argv[1], sys.argv[2], int(sys.argv[3]))
print("held" if fd is not None else "full", flush=True)
signal.pause()  # hold the slot until the test kills us
"""


def holder(path, key, limit):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), key, str(limit)],
                         stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def test_limit_per_key_and_release_on_kill(tmp_path):
    lock = tmp_path / "connections.lock"
    procs = []
    try:
        for expect in ("held", "held", "full"):
            p, state = holder(lock, "192.0.2.1", 2)
            procs.append(p)
            assert state == expect
        p, state = holder(lock, "192.0.2.2", 2)
        procs.append(p)
        assert state == "held", "another address has its own slots"
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        p, state = holder(lock, "192.0.2.1", 2)
        procs.append(p)
        assert state == "held", "a killed holder's slot is free again"
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        acquire(str(tmp_path / "x"), "k", 0)
    with pytest.raises(OSError):
        acquire(str(tmp_path / "missing" / "x"), "k", 1)
