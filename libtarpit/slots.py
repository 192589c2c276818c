"""Per-client connection cap: at most N concurrent connections from one IP address.

Public names:
  acquire   take one of `limit` slots for `key` in a lock file; the fd holding it, or None

tcpserver -c caps only the total; this caps one client (421 4.7.0), as Postfix
2.2+ does with smtpd_client_connection_count_limit (the old Rate Controls page,
seed 002, predates it).  Each wrapper is its own process, so the count lives in
the kernel, as POSIX byte-range locks in one sparse file: the client's slots are
the bytes [h*limit, h*limit+limit) where h is a 40-bit hash of the key, and a
slot is taken by locking its byte.  The kernel drops a process's locks when it
exits, however it exits (even SIGKILL), so a crashed wrapper never leaks a slot,
and the locks survive execve, so on the exec fast path the backend keeps the
slot for the rest of the session when the fd is left open across the exec.
(`tarpit-smtpd serve` counts in memory instead: every connection from one address
reaches the same worker.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os


def acquire(path: str, key: str, limit: int) -> int | None:
    """Return an open fd holding one of `limit` slots for `key` in lock file `path`, or None when all are taken.

    The caller keeps the fd open for as long as the connection lasts (closing
    any fd of that file in the process releases the lock).  Raises OSError when
    the lock file cannot be opened or locked for another reason; ValueError when
    limit < 1.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    digest = hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=5).digest()
    base = int.from_bytes(digest, "big") * limit
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for slot in range(limit):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, base + slot, os.SEEK_SET)
                return fd
            except (BlockingIOError, PermissionError):
                continue
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None
