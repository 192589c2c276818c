"""The environment this process was started with, before CPython changed it.

Public names:
  undo_locale_coercion   put LC_CTYPE back as exec gave it (PEP 538 sets it to C.UTF-8)

CPython started in the C or POSIX locale sets LC_CTYPE=C.UTF-8 in its own
environment (PEP 538), and every program it starts inherits that.  The wrapper
and the listener must hand the backend exactly the environment tcpserver built,
so the change is undone from the kernel's copy of what exec passed in.
"""

from __future__ import annotations

import os

_COERCED = ("C.UTF-8", "C.utf8", "UTF-8")  # the targets PEP 538 sets (Python/pylifecycle.c)


def undo_locale_coercion() -> None:
    """Restore os.environ's LC_CTYPE to its value at exec (or remove it); returns nothing.

    Costs nothing unless LC_CTYPE holds a coercion target.  Never raises: where
    /proc/self/environ cannot be read (not Linux) the environment is left as it is.
    """
    if os.environ.get("LC_CTYPE") not in _COERCED:
        return
    try:
        with open("/proc/self/environ", "rb") as f:
            original = f.read().split(b"\0")
    except OSError:
        return
    for item in original:
        if item.startswith(b"LC_CTYPE="):
            os.environ["LC_CTYPE"] = os.fsdecode(item[9:])
            return
    del os.environ["LC_CTYPE"]
