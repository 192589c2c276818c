"""The actions a driver carries out for the session: immutable values, one list, in order.

Public names:
  SendClient    write `data` to the client (through TLS once it is on)
  SendBackend   write `data` to the backend
  Sleep         sleep `seconds` watching the client; feed the SleepResult to Session.sleep_done
  StartBackend  start the backend on a socketpair; relay from now on
  Exec          replace this process with the backend on the client's fds (fast path)
  StartTLS      load the certificate, send our 220, run the TLS handshake; feed Session.tls_done
  Passthrough   from now on copy bytes both ways unread, until either side closes
  Close         close both sides and exit with `status`; write the `end` line last
  Log           write log line `event` with `fields`, a tuple of (key, value) pairs
  ACTION_TYPES  all of them

Close.linger is how long the backend may take to exit on its own after we close
its socket, before the driver sends SIGTERM: 0 when no message can be in flight
(so every process is gone within milliseconds of a bot's hang-up), longer after
QUIT or when the backend owes the reply to a message it may be queueing.
"""

from __future__ import annotations

from .values import value


class SendClient(value("SendClient", "data")):
    """Write `data` to the client."""

    __slots__ = ()


class SendBackend(value("SendBackend", "data")):
    """Write `data` to the backend."""

    __slots__ = ()


class Sleep(value("Sleep", "seconds stage")):
    """Sleep `seconds` watching the client; feed the SleepResult to sleep_done."""

    __slots__ = ()


class StartBackend(value("StartBackend", "")):
    """Start the backend on a socketpair and relay from now on."""

    __slots__ = ()


class Exec(value("Exec", "")):
    """Replace this process with the backend on the client's fds (fast path)."""

    __slots__ = ()


class StartTLS(value("StartTLS", "reply")):
    """Load the certificate; if it loads, send `reply` (our 220) and run the TLS server handshake.

    Report with tls_done(ok, detail); a certificate that does not load is reported with
    detail "certificate: ..." and `reply` is not sent (the session answers 454 instead).
    """

    __slots__ = ()


class Passthrough(value("Passthrough", "")):
    """Copy bytes both ways without reading them until either side closes (TLS pass-through)."""

    __slots__ = ()


class Close(value("Close", "reason status linger fields", defaults=(0, 0.0, ()))):
    """Close both sides, let the backend exit (up to `linger` s), exit with `status`.

    `fields` are those of the `end` line, which the driver writes last of all.
    """

    __slots__ = ()


class Log(value("Log", "event fields", defaults=((),))):
    """Write log line `event` with `fields`, a tuple of (key, value) pairs."""

    __slots__ = ()


ACTION_TYPES = (SendClient, SendBackend, Sleep, StartBackend, Exec, StartTLS, Passthrough, Close, Log)
