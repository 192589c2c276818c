"""Disconnect-aware sleep on a client fd: a tarpit that ends when the client hangs up.

Public names:
  Outcome      ELAPSED (the full time passed) or DISCONNECTED (the client left first)
  SleepResult  what happened: outcome, elapsed, early bytes, when they came, truncated
  sleep        wait on a client fd for up to `seconds`, keeping what the client sends

This is seed 000's Postfix patch in library form: instead of time.sleep(), the
wait is a poll() on the client's fd with the remaining time as the timeout, so a
client that closes (FIN) or resets (RST) ends the wait at once and the process
can exit instead of sitting out the delay.  A client that vanishes without FIN
or RST (cable pulled, NAT entry dropped) cannot be seen this way; the seed
measured 80-85 % of disconnects as detectable.

Bytes the client sends during the wait are read (up to `max_early`) and returned
in order, so the caller can replay them and log a pipelining violation.  Past
`max_early` nothing more is read: the rest stays queued in the socket, in order,
and the wait only watches for hangup (POLLRDHUP/POLLHUP/POLLERR).

The fd's blocking mode is never changed: we read only after poll() said the fd
is readable, once per readiness.  Time is read only through the `clock` argument.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import math
import os
import select
import struct
import time
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

from .values import value

if TYPE_CHECKING:
    from typing import Callable

__all__ = ["Outcome", "SleepResult", "sleep"]

# POLLRDHUP is Linux-only; elsewhere a FIN is still seen as a readable EOF
# while we read, but not once we stop reading past max_early (see docs).
_POLLRDHUP: int = getattr(select, "POLLRDHUP", 0)
_HANGUP = _POLLRDHUP | select.POLLHUP | select.POLLERR
_READ = select.POLLIN | _HANGUP
_CHUNK = 16384
# poll() takes a C int of milliseconds; longer waits are done in slices.
_MAX_POLL_MS = 86_400_000

# Errors a read can return when the peer is gone rather than when we erred.
_GONE = frozenset({
    errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.ENOTCONN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ESHUTDOWN,
})


class Outcome(enum.Enum):
    """How a sleep ended."""

    ELAPSED = "elapsed"
    DISCONNECTED = "disconnected"


class SleepResult(value("SleepResult", "outcome elapsed early early_at truncated", defaults=(b"", None, False))):
    """The result of one sleep.

    outcome    ELAPSED or DISCONNECTED
    elapsed    seconds (by `clock`) from the start to the end of the sleep, or to
               the moment the disconnect was seen
    early      every byte the client sent during the sleep, in order, at most max_early
    early_at   elapsed seconds when the first early byte was read; None if none
    truncated  the client sent more than max_early; the rest is still unread on the fd
    """

    __slots__ = ()

    @property
    def disconnected(self) -> bool:
        """True when the client left before the sleep ended."""
        return self.outcome is Outcome.DISCONNECTED

    @property
    def pipelined(self) -> bool:
        """True when the client sent anything during the sleep (seed 000's "PL")."""
        return self.early != b""


class _Watch:
    """Mutable state of one sleep; turned into a SleepResult at the end."""

    def __init__(self, fd: int, max_early: int, clock: Callable[[], float]):
        self.fd = fd
        self.max_early = max_early
        self.clock = clock
        self.start = clock()
        self.early = bytearray()
        self.early_at: float | None = None
        self.truncated = False
        self.poller = select.poll()
        self.poller.register(fd, _READ)

    def now(self) -> float:
        return self.clock() - self.start

    def result(self, outcome: Outcome) -> SleepResult:
        return SleepResult(outcome, self.now(), bytes(self.early),
                           self.early_at, self.truncated)

    def stop_reading(self) -> None:
        # Leave the rest queued on the fd; watch only for hangup from now on.
        self.truncated = True
        self.poller.modify(self.fd, _HANGUP)

    def on_event(self, events: int) -> Outcome | None:
        """Handle one poll() report; return an Outcome when the sleep is over."""
        if events & select.POLLNVAL:
            raise OSError(errno.EBADF, "sleep: fd is not open", self.fd)
        if events & select.POLLIN and not self.truncated:
            if len(self.early) < self.max_early:
                return self.read_some()
            if _pending(self.fd) != 0:
                self.stop_reading()
            elif not events & _HANGUP:
                return Outcome.DISCONNECTED  # readable with nothing queued: EOF
        if events & _HANGUP:
            return Outcome.DISCONNECTED
        return None

    def read_some(self) -> Outcome | None:
        want = min(_CHUNK, self.max_early - len(self.early))
        try:
            data = os.read(self.fd, want)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in _GONE:
                return Outcome.DISCONNECTED
            raise
        if not data:
            return Outcome.DISCONNECTED
        if self.early_at is None:
            self.early_at = self.now()
        self.early += data
        return None


def _pending(fd: int) -> int:
    """Bytes queued for reading on fd (sockets and pipes); -1 if the fd cannot say."""
    try:
        import termios  # only after max_early bytes: termios is large for a per-connection process

        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return -1
    return struct.unpack("i", raw)[0]


def _check_args(seconds: float, max_early: int) -> None:
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"sleep: seconds must be finite, not {seconds!r}")
    if max_early < 0:
        raise ValueError(f"sleep: max_early must be >= 0, not {max_early!r}")


def _already_gone(fd: int) -> bool:
    """One non-blocking look for a hangup, without reading anything."""
    poller = select.poll()
    poller.register(fd, _HANGUP)
    events = sum(ev for _, ev in poller.poll(0))
    if events & select.POLLNVAL:
        raise OSError(errno.EBADF, "sleep: fd is not open", fd)
    return bool(events & _HANGUP)


def sleep(fd: int, seconds: float, *, max_early: int = 65536,
          clock: Callable[[], float] = time.monotonic) -> SleepResult:
    """Wait up to `seconds` on client fd `fd`, ending early if the client hangs up.

    Returns a SleepResult: ELAPSED when the time ran out, DISCONNECTED as soon as
    a close (EOF), reset or hangup is seen; in both cases with every byte the
    client sent meanwhile (at most `max_early`; see SleepResult.truncated).
    `seconds <= 0` reads nothing: one non-blocking poll reports DISCONNECTED if
    the peer is already gone, ELAPSED otherwise.  EINTR is retried with the time
    left.  Works on sockets, socketpairs and pipes; the fd's flags are unchanged.

    Raises ValueError for a non-finite `seconds` or a negative `max_early`,
    OSError (EBADF) if `fd` is not open, and OSError for read errors that do not
    mean the peer left.
    """
    _check_args(seconds, max_early)
    if seconds <= 0:
        start = clock()
        outcome = Outcome.DISCONNECTED if _already_gone(fd) else Outcome.ELAPSED
        return SleepResult(outcome, clock() - start)
    watch = _Watch(fd, max_early, clock)
    while True:
        remaining = seconds - watch.now()
        if remaining <= 0:
            return watch.result(Outcome.ELAPSED)
        timeout_ms = min(math.ceil(remaining * 1000), _MAX_POLL_MS)
        try:
            ready = watch.poller.poll(timeout_ms)
        except InterruptedError:
            continue
        if not ready and timeout_ms < _MAX_POLL_MS:
            # poll() waited the whole remaining time; trust it over a clock
            # that may be a test's fake and never move.
            return watch.result(Outcome.ELAPSED)
        for _, events in ready:
            outcome = watch.on_event(events)
            if outcome is not None:
                return watch.result(outcome)
