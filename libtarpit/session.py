"""Sans-I/O policy state machine for one SMTP connection.

Public names:
  Client, classify  re-exported from libtarpit.client
  Lists           the control lists a session consults (badheloarg, rcptusers)
  SendClient, SendBackend, Sleep, StartBackend, Exec, Close, Log
                  the actions a driver carries out (immutable values, libtarpit.values)
  Session         feed it time, client bytes, backend bytes and sleep results;
                  it returns the actions, in order
  PHASES, TRANSITIONS
                  the phases of a session and the only moves between them

The driver owns every socket, process and clock.  It calls `start()`, then
for each event one of `client_data`, `backend_data`, `sleep_done`, `timeout`,
`client_gone`, `fail` and carries out the returned actions in order.  A `Sleep`
action means: run a disconnect-aware sleep on the client fd and hand the result
to `sleep_done`; nothing else is fed to the session meanwhile.  The driver reads
the client only while `wants_client()` and waits no longer than `deadline()`.

Order of checks, applied in `_rcpt` and nowhere else: allow-lists decide the
class before the session starts (trusted clients never get here on the
default policy); then the greylist state (whitelisted / deferred / first
contact); then the tarpit; then the rcptusers list; then the backend.
"""

from __future__ import annotations

import re
from collections import deque
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

from . import smtp
from .client import Client, classify  # noqa: F401  (re-exported: see the module docstring)
from .config import ClassPolicy
from .values import value

if TYPE_CHECKING:
    from typing import Any, Protocol

    from .sleep import SleepResult

    class GreylistPort(Protocol):
        """What the session needs of libtarpit.greylist.Greylist."""

        def check(self, client: str, sender: str, rcpt: str, now: float, *, suspicious: bool = True) -> Any: ...
        def tarpit_lost(self, client: str, sender: str, rcpt: str, now: float) -> None: ...
        def tarpit_passed(self, client: str, sender: str, rcpt: str, now: float) -> None: ...
        def delivered(self, client: str, now: float) -> None: ...


class Lists(value("Lists", "badheloarg rcptusers", defaults=(None, None))):
    """Control lists loaded at start; None means the list is absent (no check)."""

    __slots__ = ()


# --- actions -----------------------------------------------------------------


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


class Close(value("Close", "reason status", defaults=(0,))):
    """Close both sides, reap the backend, exit with `status`."""

    __slots__ = ()


class Log(value("Log", "event fields", defaults=((),))):
    """Write log line `event` with `fields`, a tuple of (key, value) pairs."""

    __slots__ = ()


ACTION_TYPES = (SendClient, SendBackend, Sleep, StartBackend, Exec, Close, Log)
if TYPE_CHECKING:
    Action = SendClient | SendBackend | Sleep | StartBackend | Exec | Close | Log

# --- phases: the one table of moves ------------------------------------------

PHASES = ("greet", "starting", "command", "sleeping", "data_wait", "data_body", "bdat_body", "closed")

TRANSITIONS: dict[tuple[str, str], str] = {
    ("greet", "sleep"): "sleeping",          # greet pause
    ("greet", "start"): "starting",          # no pause: start the backend
    ("sleeping", "start"): "starting",       # greet pause over
    ("starting", "banner"): "command",
    ("command", "sleep"): "sleeping",        # tarpit or error sleep
    ("sleeping", "wake"): "command",
    ("command", "data"): "data_wait",        # DATA sent, waiting for 354
    ("data_wait", "go"): "data_body",        # 354 arrived
    ("data_wait", "no"): "command",          # DATA refused
    ("data_body", "end"): "command",         # <CRLF>.<CRLF> seen
    ("command", "bdat"): "bdat_body",
    ("bdat_body", "end"): "command",
}


class LocalError(RuntimeError):
    """The driver or the session itself broke the state machine (our bug)."""


BACKEND_WAIT = 3600.0  # longest we wait for a reply the backend owes (its own timeouts come first)
TEMPFAIL = smtp.reply(451, "4.3.0 Temporary local problem, please try again later")
TIMEOUT = smtp.reply(421, "4.4.2 Timeout, closing connection")
TOO_MANY_ERRORS = smtp.reply(421, "4.7.0 Too many errors, closing connection")
PREGREET = smtp.reply(554, "5.7.1 SMTP protocol violation: you talked before my greeting")
DROP = smtp.reply(554, "5.7.1 Connection refused by policy")
HELO_REFUSED = smtp.reply(553, "5.7.1 Sorry, that HELO/EHLO argument is not acceptable")
LINE_TOO_LONG = smtp.reply(500, "5.5.2 Line too long")
TOO_MANY_RCPTS = smtp.reply(452, "4.5.3 Too many recipients")

# RFC 3030's syntax exactly: a chunk size qmail/exim would read the same way we do
_BDAT = re.compile(r"^(0|[1-9][0-9]{0,9})( LAST)?$", re.IGNORECASE)
# only <CRLF>.<CRLF> ends a message: qmail-smtpd and aiosmtpd ignore a bare-LF dot line,
# so treating "\n.\n" as the end would let a client smuggle commands past our checks
_DATA_END = re.compile(rb"\r\n\.\r\n")
MAX_BUFFER = 65536  # client bytes we hold while we cannot act on them (then we stop reading)
NO_BANNER = smtp.reply(421, "4.3.0 Service temporarily unavailable, please try again later")


class _Pending:
    """One reply the client is owed, in command order."""

    __slots__ = ("kind", "local", "close")

    def __init__(self, kind: str, local: bytes | None = None, close: str = ""):
        self.kind = kind      # backend kinds: banner helo ehlo mail rcpt data dot bdat bdat_last quit other
        self.local = local    # set for replies we make ourselves
        self.close = close    # close after sending this local reply, with this reason


class _Txn:
    """The mail transaction in progress: its sender and how many RCPTs went on."""

    __slots__ = ("sender", "rcpts")

    def __init__(self, sender: str | None = None):
        self.sender = sender
        self.rcpts = 0


class Session:
    """The policy for one connection.  See the module docstring for the protocol."""

    def __init__(self, client: Client, policy: ClassPolicy, lists: Lists,
                 greylist: GreylistPort | None, now: float, *, backend_needed: bool | None = None):
        self.client = client
        self.policy = policy
        self.lists = lists
        self.greylist = greylist
        self.phase = "greet"
        self.errors = 0
        self._start = now
        self._last = now
        self._in = smtp.LineSplitter()
        self._replies = smtp.ReplyParser()
        self._queue: deque[_Pending] = deque()
        self._txn = _Txn()
        self._tarpitted = False
        self._held: bytes | None = None     # the command line a sleep is holding
        self._sleep_stage = ""
        self._error_slept = False
        self._data_tail = b"\r\n"
        self._bdat_left = 0
        self._chunking = False      # the backend advertised CHUNKING in its last EHLO reply
        self._client_eof = False    # the client closed; we still relay what the backend owes
        self._pending_rcpt = ""
        self._already_buffered = False
        self._out: list[Action] = []
        if backend_needed is None:
            backend_needed = not policy.fast_path(lists.badheloarg is not None, lists.rcptusers is not None)
        self._proxy = backend_needed

    # --- driver entry points ---------------------------------------------

    def start(self) -> list[Action]:
        """Return the first actions: log connect, then greet pause, exec or start."""
        self._log("connect")
        if self.policy.greet_pause > 0:
            self._sleep(self.policy.greet_pause, "greet")
        else:
            self._begin(b"")
        return self._flush()

    def sleep_done(self, result: SleepResult, now: float) -> list[Action]:
        """Feed the outcome of the Sleep action last returned."""
        if self.phase != "sleeping":
            raise LocalError(f"sleep_done in phase {self.phase}")
        stage = self._sleep_stage
        self._last = now  # our own sleep is not the client's idleness
        if stage == "greet":
            self._greet_done(result)
        elif stage == "error":
            self._error_slept = True
            self._woke(result, now, stage)
        else:
            self._tarpit_done(result, now, stage)
        return self._flush()

    def client_data(self, data: bytes, now: float) -> list[Action]:
        """Feed bytes read from the client; b"" means the client closed."""
        self._last = now
        if self.phase == "closed":
            return []
        if not data:
            if self._owed() and self.phase in ("command", "data_wait"):
                # e.g. "...QUIT" then shutdown(SHUT_WR): the replies still go out, so a
                # delivered message is not retried and sent twice
                self._client_eof = True
            else:
                self._close("client_closed")
            return self._flush()
        self._in.feed(data)
        self._run(now)
        return self._flush()

    def client_gone(self, now: float) -> list[Action]:
        """A write to the client failed: it is gone for good, close at once."""
        self._last = now
        self._close("client_closed")
        return self._flush()

    def wants_client(self) -> bool:
        """True when the driver should read from the client now (else it stops reading)."""
        return (not self._client_eof and self.phase in ("command", "data_body", "bdat_body")
                and len(self._in) < MAX_BUFFER)

    def backend_data(self, data: bytes, now: float) -> list[Action]:
        """Feed bytes read from the backend; b"" means the backend closed."""
        if self.phase == "closed":
            return []
        if not data:
            tail = self._replies.pending()
            if self.phase == "starting":
                self._log("error", what="backend", detail="closed before its greeting")
                tail = NO_BANNER
            if tail:
                self._out.append(SendClient(tail))
            self._close("backend_closed")
            return self._flush()
        for r in self._replies.feed(data):
            self._backend_reply(r, now)
            if self.phase == "closed":
                break
        if self._client_eof and not self._owed() and self.phase != "closed":
            self._close("client_closed")
        self._run(now)
        return self._flush()

    def timeout(self, now: float) -> list[Action]:
        """The idle deadline passed: say 421 and close."""
        if self.phase != "closed":
            self._out.append(SendClient(TIMEOUT))
            self._close("timeout")
        return self._flush()

    def fail(self, what: str, detail: str) -> list[Action]:
        """Our own failure: 451 to the client, one error line, close."""
        if self.phase != "closed":
            self._log("error", what=what, detail=detail)
            self._out.append(SendClient(TEMPFAIL))
            self._close("error", status=111)
        return self._flush()

    def deadline(self) -> float | None:
        """Time after which `timeout()` is due, or None while sleeping/closed.

        The idle timeout is the client's: while the backend owes a reply (a slow
        content filter at end of DATA) we wait up to BACKEND_WAIT instead, so a
        message the backend may already have queued is not cut off and resent.
        """
        if self.phase in ("sleeping", "closed") or self.policy.idle_timeout <= 0:
            return None
        if any(p.local is None for p in self._queue):
            return self._last + max(self.policy.idle_timeout, BACKEND_WAIT)
        return self._last + self.policy.idle_timeout

    # --- plumbing ----------------------------------------------------------

    def _goto(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise LocalError(f"no move {event!r} from phase {self.phase!r}")
        self.phase = nxt

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _log(self, event: str, **fields: Any) -> None:
        self._out.append(Log(event, tuple(fields.items())))

    def _warn_or(self, check: str, event: str, **fields: Any) -> str:
        """Log the decision of `check` and return its action (ignore logs nothing)."""
        action = self.policy.action(check)
        if action == "warn":
            self._log(event, mode="warn", **fields)
        elif action != "ignore":
            self._log(event, **fields)
        return action

    def _close(self, reason: str, status: int = 0) -> None:
        if self.phase == "closed":
            return
        self._log("end", reason=reason, duration=round(self._last - self._start, 3))
        self.phase = "closed"
        self._out.append(Close(reason, status))

    def _sleep(self, seconds: float, stage: str) -> None:
        self._sleep_stage = stage
        self._goto("sleep")
        self._out.append(Sleep(seconds, stage))

    # --- greeting ------------------------------------------------------------

    def _greet_done(self, result: SleepResult) -> None:
        if result.disconnected and not result.early:
            self._log("greet_lost", elapsed=result.elapsed)
            self._close("greet_lost")
            return
        if result.early:
            action = self._warn_or("pregreet", "pregreet", elapsed=result.early_at or 0.0,
                                   bytes=len(result.early))
            if action in ("enforce", "drop") or result.disconnected:
                # enforce answers 554; drop hangs up without a word (seed 004)
                if action == "enforce" and not result.disconnected:
                    self._out.append(SendClient(PREGREET))
                self._close("pregreet")
                return
        self._begin(result.early)

    def _begin(self, early: bytes) -> None:
        """Exec the backend (fast path) or start it and wait for its banner."""
        if not self._proxy and not early:
            self._log("exec")
            self.phase = "closed"
            self._out.append(Exec())
            return
        self._goto("start")
        self._in.feed(early)
        self._queue.append(_Pending("banner"))
        self._out.append(StartBackend())

    # --- client side -------------------------------------------------------

    def _run(self, now: float) -> None:
        """Handle buffered client bytes as far as the phase allows."""
        while self.phase in ("command", "data_body", "bdat_body") and len(self._in):
            if self.phase == "data_body":
                self._data_bytes(self._in.take())
                continue
            if self.phase == "bdat_body":
                chunk = self._in.take(self._bdat_left)
                self._bdat_left -= len(chunk)
                self._out.append(SendBackend(chunk))
                if self._bdat_left == 0:
                    self._goto("end")
                continue
            if self.errors >= self.policy.error_soft_limit and self._held is None:
                if self._owed():
                    return  # past the soft limit, one command at a time: replies first
                if self.policy.error_sleep > 0 and not self._error_slept:
                    self._sleep(self.policy.error_sleep, "error")
                    return
            self._error_slept = False
            line = self._held
            self._held = None
            if line is None:
                line, overlong = self._in.next_line()
                if line is None:
                    return
                if overlong:
                    self._local(LINE_TOO_LONG, error=True)
                    continue
            self._command(smtp.parse_command(line), now)
        self._send_ready()

    def _owed(self) -> bool:
        """True while the backend owes the client a reply."""
        return any(p.local is None for p in self._queue)

    def _data_bytes(self, data: bytes) -> None:
        """Pass message bytes through unchanged until the end-of-data line."""
        buf = self._data_tail + data
        m = _DATA_END.search(buf)
        if m is None:
            self._out.append(SendBackend(data))
            self._data_tail = buf[-4:]
            return
        cut = m.end() - len(self._data_tail)
        self._out.append(SendBackend(data[:cut]))
        self._in.feed(data[cut:])
        self._queue.append(_Pending("dot"))
        self._goto("end")

    def _command(self, cmd: smtp.Command, now: float) -> None:
        verb = cmd.verb
        stage = {"HELO": "helo", "EHLO": "helo", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data"}.get(verb)
        if stage and stage == self.policy.tarpit_stage and stage != "rcpt" and self._want_tarpit():
            if self._tarpit(cmd.raw):
                return
        if verb in ("HELO", "EHLO"):
            self._helo(cmd)
        elif verb == "MAIL":
            self._txn = _Txn(sender=smtp.mail_path(cmd.arg) or "")
            self._forward(cmd.raw, "mail")
        elif verb == "RCPT":
            self._rcpt(cmd, now)
        elif verb == "DATA":
            self._forward(cmd.raw, "data")
            self._goto("data")
        elif verb == "BDAT" and self._chunking and _BDAT.match(cmd.arg):
            # only a backend that advertised CHUNKING reads the chunk as data; to any
            # other the bytes are commands, and must go through our checks as such
            m = _BDAT.match(cmd.arg)
            self._forward(cmd.raw, "bdat_last" if m.group(2) else "bdat")
            self._bdat_left = int(m.group(1))
            if self._bdat_left:
                self._goto("bdat")
        elif verb == "RSET":
            self._txn = _Txn()
            self._forward(cmd.raw, "other")
        elif verb == "QUIT":
            self._forward(cmd.raw, "quit")
        else:
            self._forward(cmd.raw, "other")

    def _helo(self, cmd: smtp.Command) -> None:
        if self.policy.helo_check and self.lists.badheloarg is not None:
            from . import control

            reason = control.helo_refused(cmd.arg, self.lists.badheloarg)
            if reason:
                action = self._warn_or("helo", "helo_reject", helo=smtp.printable(cmd.arg), reason=reason)
                if action == "drop":
                    return self._drop()
                if action == "enforce":
                    return self._local(HELO_REFUSED, error=True)
        self._forward(cmd.raw, "ehlo" if cmd.verb == "EHLO" else "helo")

    def _rcpt(self, cmd: smtp.Command, now: float) -> None:
        """RCPT: limits, greylist state, tarpit, rcptusers, backend (this order)."""
        rcpt = smtp.mail_path(cmd.arg)
        if rcpt is None or self._txn.sender is None:
            return self._forward(cmd.raw, "rcpt")
        if self._txn.rcpts >= self.policy.recipient_limit:
            return self._local(TOO_MANY_RCPTS, error=True)
        decision = self._greylist_check(rcpt, now)
        if decision is not None and decision.action == "defer":
            action = self._warn_or("greylist", "greylist_defer", rcpt=smtp.printable(rcpt),
                                   reason=decision.reason, retry_after=round(decision.retry_after or 0))
            if action == "drop":
                return self._drop()
            if action == "enforce":
                wait = int(decision.retry_after or 0)
                when = f"in {wait} seconds" if wait > 0 else "later"
                return self._local(smtp.reply(
                    450, f"4.7.1 <{smtp.printable(rcpt)}>: Greylisted, please try again {when}"),
                    error=True)
        elif decision is not None and decision.action == "pass":
            self._log("greylist_pass", reason=decision.reason)
            self._tarpitted = True
        if self.policy.tarpit_stage == "rcpt" and self._want_tarpit():
            self._pending_rcpt = rcpt
            if self._tarpit(cmd.raw):
                return
        self._rcpt_after_tarpit(cmd, rcpt)

    def _rcpt_after_tarpit(self, cmd: smtp.Command, rcpt: str) -> None:
        from . import control

        if self.policy.rcpt_check and self.lists.rcptusers is not None \
                and not control.rcpt_valid(rcpt, self.lists.rcptusers):
            action = self._warn_or("rcpt", "rcpt_reject", rcpt=smtp.printable(rcpt), reason="unknown_user")
            if action == "drop":
                return self._drop()
            if action == "enforce":
                return self._local(smtp.reply(
                    550, f"5.1.1 <{smtp.printable(rcpt)}>: Recipient address rejected: no such user"),
                    error=True)
        self._txn.rcpts += 1
        self._forward(cmd.raw, "rcpt")

    def _greylist_check(self, rcpt: str, now: float) -> Any:
        if self.greylist is None or self.policy.greylist == "off":
            return None
        try:
            # a normal client under "greylist" gets postgrey's plain triplet greylist
            plain = self.client.cls != "suspicious" and self.policy.greylist == "greylist"
            return self.greylist.check(self.client.key, self._txn.sender or "", rcpt, now,
                                       suspicious=not plain)
        except Exception as e:  # fail open: a broken store must not cost mail
            self._log("error", what="greylist", detail=smtp.printable(str(e)))
            return None

    def _greylist_call(self, method: str, *args: Any) -> None:
        if self.greylist is None or self.policy.greylist == "off":
            return
        try:
            getattr(self.greylist, method)(self.client.key, *args)
        except Exception as e:  # fail open, as above
            self._log("error", what="greylist", detail=smtp.printable(str(e)))

    # --- tarpit ------------------------------------------------------------

    def _want_tarpit(self) -> bool:
        return not self._tarpitted and self.policy.tarpit > 0 and self.policy.tarpit_action != "ignore"

    def _tarpit(self, raw: bytes) -> bool:
        """Start the tarpit holding command `raw`; False when warn mode lets it through."""
        self._tarpitted = True
        stage = self.policy.tarpit_stage
        action = self._warn_or("tarpit", "tarpit_start", stage=stage, seconds=self.policy.tarpit)
        if action == "drop":  # no hold at all: refuse and hang up (for a site under load)
            self._drop()
            return True
        if action != "enforce":
            return False
        self._held = raw
        self._already_buffered = len(self._in) > 0
        self._sleep(self.policy.tarpit, stage)
        return True

    def _tarpit_done(self, result: SleepResult, now: float, stage: str) -> None:
        sender, rcpt = self._txn.sender or "", self._pending_rcpt
        if self._already_buffered or result.early:
            at = 0.0 if self._already_buffered else (result.early_at or 0.0)
            action = self._warn_or("pipelining", "pipelining", stage=stage, elapsed=at,
                                   bytes=len(self._in) + len(result.early))
        else:
            action = "ignore"
        if result.disconnected:
            self._log("tarpit_lost", stage=stage, elapsed=result.elapsed)
            self._greylist_call("tarpit_lost", sender, rcpt, now)
            self._last = now
            self._close("tarpit_lost")
            return
        self._log("tarpit_done", stage=stage, elapsed=result.elapsed)
        self._greylist_call("tarpit_passed", sender, rcpt, now)
        if action in ("enforce", "drop"):
            self._goto("wake")
            return self._drop()
        self._woke(result, now, stage)

    def _woke(self, result: SleepResult, now: float, stage: str) -> None:
        if result.disconnected:
            self._last = now
            self._close("client_closed")
            return
        self._goto("wake")
        self._last = now
        held = self._held
        self._in.feed(result.early)
        if held is not None and stage not in ("greet", "error"):
            self._held = None
            cmd = smtp.parse_command(held)
            if cmd.verb == "RCPT":
                self._rcpt_after_tarpit(cmd, self._pending_rcpt)
            else:
                self._command(cmd, now)
        self._run(now)

    # --- replies -----------------------------------------------------------

    def _forward(self, raw: bytes, kind: str) -> None:
        self._queue.append(_Pending(kind))
        self._out.append(SendBackend(raw))

    def _local(self, data: bytes, *, error: bool = False, close: str = "") -> None:
        if error:
            self.errors += 1
        self._queue.append(_Pending("local", data, close))
        self._send_ready()
        if error and self.errors >= self.policy.error_hard_limit:
            self._too_many_errors()

    def _too_many_errors(self) -> None:
        """421 at once and close: replies still owed do not matter to a client we drop."""
        if self.phase != "closed":
            self._out.append(SendClient(TOO_MANY_ERRORS))
            self._close("too_many_errors")

    def _drop(self) -> None:
        self._local(DROP, close="policy")

    def _send_ready(self) -> None:
        """Send the local replies now at the head of the queue."""
        while self._queue and self._queue[0].local is not None and self.phase != "closed":
            p = self._queue.popleft()
            self._out.append(SendClient(p.local))
            if p.close:
                self._close(p.close)

    def _backend_reply(self, r: smtp.Reply, now: float) -> None:
        p = self._queue.popleft() if self._queue and self._queue[0].local is None else _Pending("other")
        raw = r.raw
        if p.kind == "banner":
            self._goto("banner")
        elif p.kind in ("ehlo", "helo"):
            self._chunking = p.kind == "ehlo" and r.code == 250 and b"CHUNKING" in smtp.extensions(r)
            if p.kind == "ehlo" and self.policy.hide_pipelining and r.code == 250:
                # PIPECONNECT (exim) presumes PIPELINING, so it goes too
                raw = smtp.drop_extension(r, b"PIPELINING", b"PIPECONNECT")
        elif p.kind == "data":
            self._goto("go" if r.code == 354 else "no")
            self._data_tail = b"\r\n"
        elif p.kind in ("dot", "bdat_last") and r.positive:
            self._txn = _Txn()
            self.errors = 0  # as Postfix: a delivered message resets the error counter (seed 002)
            self._greylist_call("delivered", now)
        self._out.append(SendClient(raw))
        if r.code >= 400 and p.kind != "banner":
            self.errors += 1
            if self.errors >= self.policy.error_hard_limit:
                self._too_many_errors()
                return
        self._send_ready()
