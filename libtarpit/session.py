"""Sans-I/O policy for one SMTP connection: the phases, the checks, the transaction.

Public names:
  Client, classify  re-exported from libtarpit.client
  Lists           re-exported from libtarpit.checks
  SendClient, SendBackend, Sleep, StartBackend, Exec, StartTLS, Passthrough, Close, Log
                  the actions a driver carries out (libtarpit.actions)
  Session         feed it time, client bytes, backend bytes and sleep/TLS results;
                  it returns the actions, in order
  PHASES, TRANSITIONS
                  the phases of a session and the only moves between them

Driver protocol.  The driver owns every socket, process and clock.  It calls
`start()`, then for each event one of `client_data`, `backend_data`,
`sleep_done`, `tls_done`, `timeout`, `client_gone`, `fail`, and carries out the
returned actions in order.  A `Sleep` means: run a disconnect-aware sleep on the
client and hand the result to `sleep_done`; nothing else is fed meanwhile.  A
`StartTLS` means: load the certificate, send its reply (our 220) after the
replies before it, run the TLS handshake on the client and call `tls_done`.  The driver reads the client only
while `wants_client()` and waits no longer than `deadline()`.  `Close` carries
the `end` line, which the driver writes after the backend has exited.  A driver with a limit on
backends running at once passes `full`, a callable giving that limit once it is
reached (else 0): when the backend is due, the session then answers 421 and
closes (`backend_limit`) instead of asking for it.

The transaction follows the backend's replies, never the client's lines
(h11's rule: change state on what both peers agree on).  A transaction starts
on the backend's 2xx to MAIL; RSET, HELO and EHLO end it only on a 2xx; a BDAT
chunk is data only inside a transaction the backend confirmed.  While the
backend owes the reply to a command that changes state, the next command waits.
Command lines are read by libtarpit.envelope in the one spelling every backend
reads alike; anything else is refused here (501), never forwarded unchecked.

Order of checks, applied in `_rcpt` and nowhere else: the allow-lists decide the
class before the session starts; then authentication (an authenticated client
skips the rest); the recipient limit; the greylist state; the tarpit; rcptusers;
then the backend.  Each verdict's action is applied by `_judge`.
"""

from __future__ import annotations

from . import checks, envelope, smtp
from .actions import (ACTION_TYPES, Close, Exec, Log, Passthrough, SendBackend, SendClient,  # noqa: F401
                      Sleep, StartBackend, StartTLS)
from .client import Client, classify  # noqa: F401  (re-exported: see the module docstring)
from .checks import Lists  # noqa: F401  (re-exported: see the module docstring)
from .config import ClassPolicy
from .relay import MAX_BUFFER, Relay

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection
if TYPE_CHECKING:
    from typing import Any, Callable, Protocol

    from .sleep import SleepResult

    class GreylistPort(Protocol):
        """What the session needs of libtarpit.greylist.Greylist."""

        def check(self, client: str, sender: str, rcpt: str, now: float, *, suspicious: bool = True) -> Any: ...
        def tarpit_lost(self, client: str, sender: str, rcpt: str, now: float) -> None: ...
        def tarpit_passed(self, client: str, sender: str, rcpt: str, now: float) -> None: ...
        def delivered(self, client: str, now: float) -> None: ...

    Action = SendClient | SendBackend | Sleep | StartBackend | Exec | StartTLS | Passthrough | Close | Log


# --- phases: the one table of moves ------------------------------------------

PHASES = ("greet", "starting", "command", "sleeping", "data_wait", "data_body", "bdat_body",
          "tls", "passthrough", "closed")

TRANSITIONS: dict[tuple[str, str], str] = {
    ("greet", "sleep"): "sleeping",          # greet pause
    ("greet", "start"): "starting",          # no pause: start the backend
    ("greet", "exec"): "closed",             # fast path: the backend replaces us
    ("sleeping", "start"): "starting",       # greet pause over
    ("sleeping", "exec"): "closed",
    ("starting", "banner"): "command",
    ("command", "sleep"): "sleeping",        # tarpit or error sleep
    ("sleeping", "wake"): "command",
    ("command", "data"): "data_wait",        # DATA sent, waiting for 354
    ("data_wait", "go"): "data_body",        # 354 arrived
    ("data_wait", "no"): "command",          # DATA refused
    ("data_body", "end"): "command",         # <CRLF>.<CRLF> seen
    ("command", "bdat"): "bdat_body",
    ("bdat_body", "end"): "command",
    ("command", "tls"): "tls",               # our 220 to STARTTLS: handshake next
    ("tls", "secured"): "command",
    ("tls", "unavailable"): "command",       # our certificate did not load: 454, plaintext goes on
    ("command", "passthrough"): "passthrough",  # the backend's 220 to STARTTLS: bytes only
    **{(p, "close"): "closed" for p in ("greet", "starting", "command", "sleeping", "data_wait",
                                        "data_body", "bdat_body", "tls", "passthrough")},
}


class LocalError(RuntimeError):
    """The driver or the session itself broke the state machine (our bug)."""


BACKEND_WAIT = 3600.0  # longest we wait for a reply the backend owes (its own timeouts come first)
DATA_GRACE = 30.0      # seconds of DATA before the minimum data rate applies
LINGER_QUIT = 5.0      # the backend's own exit after QUIT or a client's close
LINGER_MESSAGE = 60.0  # ... when it may be queueing a message
TEMPFAIL = smtp.reply(451, "4.3.0 Temporary local problem, please try again later")
TIMEOUT = smtp.reply(421, "4.4.2 Timeout, closing connection")
TOO_SLOW = smtp.reply(421, "4.4.2 Too slow, closing connection")
TOO_MANY_ERRORS = smtp.reply(421, "4.7.0 Too many errors, closing connection")
PREGREET = smtp.reply(554, "5.7.1 SMTP protocol violation: you talked before my greeting")
DROP = smtp.reply(554, "5.7.1 Connection refused by policy")
LINE_TOO_LONG = smtp.reply(500, "5.5.2 Line too long")
SYNTAX = smtp.reply(501, "5.5.4 Syntax error in parameters or arguments")
NO_MAIL = smtp.reply(503, "5.5.1 Bad sequence of commands: MAIL first")
IN_TXN = smtp.reply(503, "5.5.1 Bad sequence of commands: not inside a mail transaction")
TLS_ACTIVE = smtp.reply(503, "5.5.1 TLS already active")
TLS_READY = smtp.reply(220, "2.0.0 Ready to start TLS")
TLS_UNAVAILABLE = smtp.reply(454, "4.7.0 TLS not available due to temporary reason")
TOO_MANY_RCPTS = smtp.reply(452, "4.5.3 Too many recipients")
NO_BANNER = smtp.reply(421, "4.3.0 Service temporarily unavailable, please try again later")
BACKEND_GONE = smtp.reply(421, "4.3.0 Service not available, closing connection")
BUSY = smtp.reply(421, "4.3.2 Too busy, try again later")
# replies to these change the transaction: the next command waits for them
_BARRIER = ("banner", "helo", "ehlo", "mail", "rset", "data", "dot", "bdat", "bdat_last",
            "auth", "auth_data", "starttls")
_STAGES = {"HELO": "helo", "EHLO": "helo", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data"}
# session ends after which no message can be half-way into the backend: stop it at once
_AT_ONCE = frozenset({"tarpit_lost", "greet_lost", "pregreet", "timeout", "session_limit", "slow_data",
                      "too_many_errors", "policy", "error", "backend_limit"})


class Session:
    """The policy for one connection.  See the module docstring for the protocol."""

    # slots: a held connection's state is counted in KB by the listener (bench/serve_memory.py)
    __slots__ = ('client', 'policy', 'lists', 'greylist', 'phase', 'errors', '_start', '_last', '_out', '_relay', '_proxy', '_full', '_tls_offer', '_tls_ours', 'tls', 'authenticated', '_auth_mech', '_auth_data', '_sender', '_rcpts', '_rcpts_sent', '_tarpitted', '_held', '_held_rcpt', '_sleep_stage', '_error_slept', '_chunking', '_size', '_client_eof', '_quit', '_buffered_at_hold', '_stalled', '_data_start', '_data_bytes', '_msgs')

    def __init__(self, client: Client, policy: ClassPolicy, lists: Lists,
                 greylist: GreylistPort | None, now: float, *, proxy: bool = True,
                 tls: bool = False, full: Callable[[], int] | None = None):
        self.client = client
        self.policy = policy
        self.lists = lists
        self.greylist = greylist if policy.greylist != "off" else None
        self.phase = "greet"
        self.errors = 0
        self._start = now
        self._last = now
        self._out: list[Action] = []
        self._relay = Relay(self._out)
        self._proxy = proxy
        self._full = full           # the driver's backend limit: its value once reached, else 0
        self._tls_offer = tls       # we terminate STARTTLS ourselves (a certificate is configured)
        self._tls_ours = tls        # ... so the backend's STARTTLS is never the client's, even if ours broke
        self.tls = False            # the client side is encrypted (terminated here or passed through)
        self.authenticated = False
        self._auth_mech = ""
        self._auth_data = False     # the next client line answers a 334 challenge
        self._sender: str | None = None   # the confirmed transaction's sender; None: no transaction
        self._rcpts = 0             # recipients the backend accepted in this transaction
        self._rcpts_sent = 0        # recipients forwarded whose reply is still owed
        self._tarpitted = False
        self._held: tuple[str, str, bytes] | None = None   # (verb, arg, raw) a sleep is holding
        self._held_rcpt = ""
        self._sleep_stage = ""
        self._error_slept = False
        self._chunking = False      # the backend advertised CHUNKING in its last EHLO reply
        self._size = 0              # ... and this SIZE (0: none)
        self._client_eof = False    # the client closed; we still relay what the backend owes
        self._quit = False          # the backend said 221
        self._buffered_at_hold = False
        self._stalled = False
        self._data_start = 0.0
        self._data_bytes = 0
        self._msgs = 0              # messages the backend accepted (2xx to end of DATA / BDAT LAST)

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

    def tls_done(self, ok: bool, detail: str, now: float) -> list[Action]:
        """Feed the outcome of the StartTLS action: the handshake finished, or failed with `detail`."""
        if self.phase != "tls":
            raise LocalError(f"tls_done in phase {self.phase}")
        self._last = now
        if not ok and detail.startswith("certificate:"):
            # ours, not the client's: an error line, 454, and the session goes on in plaintext
            # without offering STARTTLS again (RFC 3207's answer for a server that cannot)
            self._log("error", what="tls", detail=smtp.printable(detail))
            self._tls_offer = False
            self._goto("unavailable")
            self._local(TLS_UNAVAILABLE)
            self._run(now)
            return self._flush()
        if not ok:
            self._log("tls_failed", detail=smtp.printable(detail))
            self._close("tls_failed")
            return self._flush()
        self.tls = True
        self._log("tls", detail=smtp.printable(detail))
        self._goto("secured")
        self._run(now)
        return self._flush()

    def client_data(self, data: bytes, now: float) -> list[Action]:
        """Feed bytes read from the client; b"" means the client closed."""
        self._last = now
        if self.phase == "closed":
            return []
        if self.phase == "sleeping":
            raise LocalError("client_data while sleeping: the sleep's result carries the client's bytes")
        if not data:
            if self._relay.owed() and self.phase in ("command", "data_wait"):
                # e.g. "...QUIT" then shutdown(SHUT_WR): the replies still go out, so a
                # delivered message is not retried and sent twice
                self._client_eof = True
            else:
                self._close("client_closed")
            return self._flush()
        self._relay.inbuf.feed(data)
        if self.phase == "data_body":
            self._data_bytes += len(data)
            if self._too_slow(now):
                return self._flush()
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
                and len(self._relay.inbuf) < MAX_BUFFER)

    def backend_data(self, data: bytes, now: float) -> list[Action]:
        """Feed bytes read from the backend; b"" means the backend closed."""
        if self.phase == "closed":
            return []
        if not data:
            self._backend_closed()
            return self._flush()
        for p, r in self._relay.replies(data):
            self._reply(p, r, now)
            if self.phase == "closed":
                return self._flush()
        self._run(now)  # commands the client sent before it half-closed go on first
        if self._client_eof and not self._relay.owed() and self.phase != "sleeping":
            # (a sleep that _run just started sees the hang-up itself and reports it)
            self._close("client_closed")
        return self._flush()

    def timeout(self, now: float) -> list[Action]:
        """The idle deadline or the session limit passed: say 421 and close."""
        if self.phase != "closed":
            over = self.policy.session_limit > 0 and now >= self._start + self.policy.session_limit
            self._out.append(SendClient(TIMEOUT))
            self._last = now
            self._close("session_limit" if over else "timeout")
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
        The session limit bounds the whole connection (a trickling client).
        """
        if self.phase in ("sleeping", "closed", "tls", "passthrough"):
            return None
        out = None
        if self.policy.idle_timeout > 0:
            idle = max(self.policy.idle_timeout, BACKEND_WAIT) if self._relay.owed() else self.policy.idle_timeout
            out = self._last + idle
        if self.policy.session_limit > 0:
            end = self._start + self.policy.session_limit
            out = end if out is None else min(out, end)
        return out

    # --- plumbing ----------------------------------------------------------

    def _goto(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise LocalError(f"no move {event!r} from phase {self.phase!r}")
        self.phase = nxt

    def _flush(self) -> list[Action]:
        out = self._out[:]
        del self._out[:]
        return out

    def _log(self, event: str, **fields: Any) -> None:
        self._out.append(Log(event, tuple(fields.items())))

    def _close(self, reason: str, status: int = 0) -> None:
        if self.phase == "closed":
            return
        if reason in _AT_ONCE:
            linger = 0.0
        elif self._relay.owed("dot", "bdat_last"):
            linger = LINGER_MESSAGE
        else:
            linger = LINGER_QUIT
        fields = [("reason", reason), ("duration", round(self._last - self._start, 3))]
        if self.tls:
            fields.append(("tls", 1))
        if self.authenticated:
            fields.append(("auth", 1))
        fields.append(("msgs", self._msgs))  # always: its absence marks a log from before it
        self._goto("close")
        self._out.append(Close(reason, status, linger, tuple(fields)))

    def _sleep(self, seconds: float, stage: str) -> None:
        self._sleep_stage = stage
        self._goto("sleep")
        self._out.append(Sleep(seconds, stage))

    def _judge(self, verdict: checks.Verdict) -> str:
        """Apply a verdict's configured action; return "pass", "warn", "enforce" or "drop".

        Logs the verdict (with mode=warn for warn; nothing for ignore).  For a
        verdict with a reply, enforce answers it here (counted as an error) and
        drop answers 554 and closes.  A verdict without one (pregreet, tarpit)
        leaves enforce and drop to the caller.  The caller carries on for pass
        and warn, and stops for enforce and drop.
        """
        what = checks.outcome(checks.action_of(self.policy, verdict.check))
        event = checks.CHECKS[verdict.check].event
        if what == "warn":
            self._out.append(Log(event, (("mode", "warn"),) + verdict.fields))
        elif what != "pass":
            self._out.append(Log(event, verdict.fields))
        if verdict.reply is not None and what == "drop":
            self._drop()
        elif verdict.reply is not None and what == "enforce":
            self._local(verdict.reply, error=True)
        return what

    # --- greeting ------------------------------------------------------------

    def _greet_done(self, result: SleepResult) -> None:
        if result.disconnected and not result.early:
            self._log("greet_lost", elapsed=result.elapsed)
            self._close("greet_lost")
            return
        if result.early:
            verdict = checks.Verdict("pregreet", "early", None,
                                     (("elapsed", result.early_at or 0.0), ("bytes", len(result.early))))
            what = self._judge(verdict)
            if what in ("enforce", "drop") or result.disconnected:
                if what == "enforce" and not result.disconnected:
                    self._out.append(SendClient(PREGREET))
                self._close("pregreet")  # drop hangs up without a word (seed 004)
                return
        self._begin(result.early)

    def _begin(self, early: bytes) -> None:
        """Exec the backend (fast path) or start it and wait for its banner; 421 if the driver's
        limit on backends running at once is reached (nothing was said to the client yet)."""
        limit = self._full() if self._full is not None else 0
        if limit:
            self._log("backend_limit", limit=limit)
            self._out.append(SendClient(BUSY))
            self._close("backend_limit")
            return
        if not self._proxy and not early:
            self._log("exec")
            self._goto("exec")
            self._out.append(Exec())
            return
        self._goto("start")
        self._relay.inbuf.feed(early)
        self._relay.expect("banner")
        self._out.append(StartBackend())

    # --- client side -------------------------------------------------------

    def _run(self, now: float) -> None:
        """Handle buffered client bytes as far as the phase allows."""
        relay = self._relay
        while self.phase in ("command", "data_body", "bdat_body") and len(relay.inbuf):
            if self.phase == "data_body":
                if relay.body():
                    self._goto("end")
                continue
            if self.phase == "bdat_body":
                if relay.chunk():
                    self._goto("end")
                continue
            if relay.owed(*_BARRIER):
                break  # the transaction is what the backend's next reply says
            if self._held is None and self.errors >= self.policy.error_soft_limit:
                if relay.owed():
                    break  # past the soft limit, one command at a time: replies first
                if self.policy.error_sleep > 0 and not self._error_slept:
                    self._sleep(self.policy.error_sleep, "error")
                    return
            line, overlong = relay.inbuf.next_line()
            if line is None:
                break
            self._error_slept = False
            if overlong:
                self._local(LINE_TOO_LONG, error=True)
            elif self._auth_data:
                self._auth_data = False  # an answer to a 334 challenge: opaque, never logged
                relay.forward(line, "auth_data")
            else:
                self._command(line, now)
            if self._stalled:
                self._stalled = False
                break  # that command waits for the replies the backend still owes
        self._send_ready()

    def _command(self, line: bytes, now: float) -> None:
        split = envelope.verb_split(line)
        if split is None:
            return self._local(SYNTAX, error=True)
        verb, arg = split
        stage = _STAGES.get(verb)
        if stage and stage == self.policy.tarpit_stage and stage != "rcpt" and self._want_tarpit():
            if self._tarpit(verb, arg, line, ""):
                return
        self._dispatch(verb, arg, line, now)

    def _dispatch(self, verb: str, arg: str, line: bytes, now: float) -> None:
        """Carry out one parsed command (after any tarpit that held it)."""
        relay = self._relay
        if verb in envelope.NO_ARG_VERBS and not envelope.no_arg(arg):
            return self._local(SYNTAX, error=True)
        if verb in ("HELO", "EHLO"):
            self._helo(verb, arg, line)
        elif verb == "MAIL":
            sender = envelope.mail_arg(arg)
            if sender is None:
                return self._local(SYNTAX, error=True)
            relay.forward(line, "mail", sender)
        elif verb == "RCPT":
            self._rcpt(arg, line, now)
        elif verb == "DATA":
            relay.forward(line, "data")
            self._goto("data")
        elif verb == "BDAT":
            self._bdat(arg, line)
        elif verb == "RSET":
            relay.forward(line, "rset")
        elif verb == "QUIT":
            relay.forward(line, "quit")
        elif verb == "STARTTLS":
            self._starttls(line, now)
        elif verb == "AUTH":
            self._auth_mech = smtp.printable(arg.split(" ", 1)[0].upper(), 20) if arg else ""
            relay.forward(line, "auth")
        else:
            relay.forward(line, "other")

    def _helo(self, verb: str, arg: str, line: bytes) -> None:
        name = envelope.helo_arg(arg)
        if name is None:
            return self._local(SYNTAX, error=True)
        if not self.authenticated:
            verdict = checks.helo(name, self.client.ip, self.lists, self.policy)
            if verdict is not None and self._judge(verdict) in ("enforce", "drop"):
                return
        self._relay.forward(line, verb.lower())

    def _rcpt(self, arg: str, line: bytes, now: float) -> None:
        """RCPT: syntax, transaction, limit, greylist state, tarpit, rcptusers, backend (this order)."""
        rcpt = envelope.rcpt_arg(arg)
        if rcpt is None:
            return self._local(SYNTAX, error=True)
        if self._sender is None:
            return self._local(NO_MAIL, error=True)
        if self._rcpts + self._rcpts_sent >= self.policy.recipient_limit:
            return self._local(TOO_MANY_RCPTS, error=True)
        if self.authenticated:
            return self._forward_rcpt(line, rcpt)
        decision = self._greylist_check(rcpt, now)
        if decision is not None and decision.action == "defer":
            if self._judge(checks.greylist_defer(decision, rcpt)) in ("enforce", "drop"):
                return
        elif decision is not None and decision.action == "pass":
            self._log("greylist_pass", reason=decision.reason)
            self._tarpitted = True
        elif decision is not None and not self._want_tarpit():
            # taRgrey asks for a tarpit this client's policy does not have (TARPIT=0 or
            # ignored): pass, record nothing, and say so
            self._log("greylist_pass", reason="no_tarpit")
            self._tarpitted = True
        if self.policy.tarpit_stage == "rcpt" and self._want_tarpit():
            if self._tarpit("RCPT", arg, line, rcpt):
                return
        self._rcpt_checked(line, rcpt)

    def _rcpt_checked(self, line: bytes, rcpt: str) -> None:
        """The rest of RCPT after the tarpit: rcptusers, then the backend."""
        if not self.authenticated:
            verdict = checks.rcpt(rcpt, self.lists, self.policy)
            if verdict is not None and self._judge(verdict) in ("enforce", "drop"):
                return
        self._forward_rcpt(line, rcpt)

    def _forward_rcpt(self, line: bytes, rcpt: str) -> None:
        self._rcpts_sent += 1
        self._relay.forward(line, "rcpt", rcpt)

    def _bdat(self, arg: str, line: bytes) -> None:
        """BDAT: a chunk only inside a confirmed transaction, sizes as every backend reads them."""
        if self._relay.owed("rcpt"):
            # whether a transaction with recipients exists is the backend's word: wait for it
            self._relay.inbuf.feed(line, front=True)
            self._stalled = True
            return
        size = envelope.bdat_arg(arg, self._size or envelope.BDAT_LIMIT)
        if size is None:
            return self._local(SYNTAX, error=True)
        n, last = size
        if not self._chunking or self._sender is None or self._rcpts == 0:
            # refuse, and swallow the chunk the client sends anyway: its bytes are data,
            # never commands (and never reach the backend)
            self._local(NO_MAIL if self._sender is None else IN_TXN, error=True)
            self._relay.start_chunk(n, discard=True)
        else:
            self._relay.forward(line, "bdat_last" if last else "bdat")
            self._relay.start_chunk(n)
        if n:
            self._goto("bdat")

    def _starttls(self, line: bytes, now: float) -> None:
        if self.tls:
            return self._local(TLS_ACTIVE, error=True)
        if self._sender is not None:
            return self._local(IN_TXN, error=True)
        if self._tls_ours and not self._tls_offer:
            return self._local(TLS_UNAVAILABLE, error=True)
        if self._tls_offer:
            if self._relay.owed():
                # our 220 and the handshake come after every reply owed for earlier commands
                self._relay.inbuf.feed(line, front=True)
                self._stalled = True
                return
            self._discard_injected()
            self._goto("tls")
            self._out.append(StartTLS(TLS_READY))
            return
        if self.policy.tarpit_before_tls and self._want_tarpit():
            # pass-through: after the backend's 220 we see nothing, so the tarpit runs now, unless
            # taRgrey already knows the client (whitelisted, or it sat through before STARTTLS:
            # the ("", "") triple the tarpit below records)
            decision = self._greylist_check("", now)
            if decision is not None and decision.action == "pass":
                self._log("greylist_pass", reason=decision.reason)
                self._tarpitted = True
            elif self._tarpit("STARTTLS", "", line, ""):
                return
        self._relay.forward(line, "starttls")

    def _discard_injected(self) -> None:
        """Plaintext after STARTTLS must never run inside TLS (CVE-2011-0411): drop and log it."""
        junk = self._relay.inbuf.take()
        if junk:
            self._log("tls_injection", bytes=len(junk))

    def _greylist_check(self, rcpt: str, now: float) -> Any:
        if self.greylist is None:
            return None
        try:
            # a normal client under "greylist" gets postgrey's plain triplet greylist
            plain = self.client.cls != "suspicious" and self.policy.greylist == "greylist"
            return self.greylist.check(self.client.key, self._sender or "", rcpt, now, suspicious=not plain)
        except Exception as e:  # fail open: a broken store must not cost mail
            self._log("error", what="greylist", detail=smtp.printable(str(e)))
            return None

    def _greylist_call(self, method: str, *args: Any) -> None:
        if self.greylist is None or self.authenticated:
            return
        try:
            getattr(self.greylist, method)(self.client.key, *args)
        except Exception as e:  # fail open, as above
            self._log("error", what="greylist", detail=smtp.printable(str(e)))

    # --- tarpit ------------------------------------------------------------

    def _want_tarpit(self) -> bool:
        return (not self._tarpitted and not self.authenticated and self.policy.tarpit > 0
                and self.policy.tarpit_action != "ignore")

    def _tarpit(self, verb: str, arg: str, line: bytes, rcpt: str) -> bool:
        """Start the tarpit holding a command; False when warn mode lets it through."""
        self._tarpitted = True
        stage = "tls" if verb == "STARTTLS" else self.policy.tarpit_stage
        verdict = checks.Verdict("tarpit", stage, None, (("stage", stage), ("seconds", self.policy.tarpit)))
        what = self._judge(verdict)
        if what == "drop":  # no hold at all: refuse and hang up (for a site under load)
            self._drop()
            return True
        if what != "enforce":
            return False
        self._held = (verb, arg, line)
        self._held_rcpt = rcpt
        self._buffered_at_hold = len(self._relay.inbuf) > 0
        self._sleep(self.policy.tarpit, stage)
        return True

    def _tarpit_done(self, result: SleepResult, now: float, stage: str) -> None:
        sender, rcpt = self._sender or "", self._held_rcpt
        what = "pass"
        if self._buffered_at_hold or result.early:
            at = 0.0 if self._buffered_at_hold else (result.early_at or 0.0)
            verdict = checks.Verdict("pipelining", "early", None,
                                     (("stage", stage), ("elapsed", at),
                                      ("bytes", len(self._relay.inbuf) + len(result.early))))
            what = self._judge(verdict)
        if result.disconnected:
            self._log("tarpit_lost", stage=stage, elapsed=result.elapsed)
            self._greylist_call("tarpit_lost", sender, rcpt, now)
            self._last = now
            self._close("tarpit_lost")
            return
        self._log("tarpit_done", stage=stage, elapsed=result.elapsed)
        self._greylist_call("tarpit_passed", sender, rcpt, now)
        if what in ("enforce", "drop"):
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
        self._relay.inbuf.feed(result.early)
        held, self._held = self._held, None
        if held is not None and stage not in ("greet", "error"):
            verb, arg, line = held
            if verb == "RCPT":
                self._rcpt_checked(line, self._held_rcpt)
            else:
                self._dispatch(verb, arg, line, now)
        self._run(now)

    # --- replies -----------------------------------------------------------

    def _local(self, data: bytes, *, error: bool = False, close: str = "") -> None:
        if error:
            self.errors += 1
        self._relay.answer(data, close)
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
        if self.phase == "closed":
            return
        for p in self._relay.ready():
            self._out.append(SendClient(p.local))
            if p.close:
                self._close(p.close)
                return

    def _backend_closed(self) -> None:
        tail = self._relay.backend_tail()
        if self.phase == "starting":
            self._log("error", what="backend", detail="closed before its greeting")
            tail = NO_BANNER
        elif not self._quit and self.phase != "passthrough":
            # it died mid-session: the client gets a reply, not a silent close
            self._log("error", what="backend", detail="closed in mid-session")
            tail = tail + BACKEND_GONE if tail.endswith(b"\n") or not tail else BACKEND_GONE
        if tail:
            self._out.append(SendClient(tail))
        self._close("backend_closed")

    def _reply(self, p: Any, r: smtp.Reply, now: float) -> None:
        """One backend reply to command `p`: update the transaction from it, pass it on."""
        raw = r.raw
        ok = 200 <= r.code < 300
        kind = p.kind
        if kind == "banner":
            self._goto("banner")
        elif kind in ("ehlo", "helo"):
            if ok:
                self._sender, self._rcpts = None, 0
            if kind == "ehlo" and ok:
                raw = self._ehlo_reply(r)
        elif kind == "mail" and ok:
            self._sender, self._rcpts = p.arg, 0
        elif kind == "rcpt":
            self._rcpts_sent -= 1
            if ok:
                self._rcpts += 1
        elif kind == "rset" and ok:
            self._sender, self._rcpts = None, 0
        elif kind == "data":
            self._goto("go" if r.code == 354 else "no")
            if r.code == 354:
                self._relay.start_body()
                self._data_start, self._data_bytes = now, 0
        elif kind in ("dot", "bdat_last"):
            self._sender, self._rcpts = None, 0  # the transaction ends, delivered or not
            if ok:
                self._msgs += 1
                self.errors = 0  # as Postfix: a delivered message resets the error counter (seed 002)
                self._greylist_call("delivered", now)
        elif kind in ("auth", "auth_data"):
            self._auth_reply(r)
        elif kind == "quit" and r.code == 221:
            self._quit = True
        self._out.append(SendClient(raw))
        if kind == "starttls" and r.code == 220:
            self._discard_injected()
            self.tls = True
            self._log("tls_passthrough")
            self._goto("passthrough")
            self._out.append(Passthrough())
            return
        if r.code >= 400 and kind != "banner":
            self.errors += 1
            if self.errors >= self.policy.error_hard_limit:
                self._too_many_errors()
                return
        self._send_ready()

    def _auth_reply(self, r: smtp.Reply) -> None:
        if r.code == 334:
            self._auth_data = True
        elif r.code == 235:
            self.authenticated = True
            self._log("auth", mech=self._auth_mech, result="ok")
        else:
            self._log("auth", mech=self._auth_mech, result="fail", code=r.code)

    def _ehlo_reply(self, r: smtp.Reply) -> bytes:
        """The backend's EHLO reply as the client sees it; notes CHUNKING and SIZE."""
        exts = smtp.extensions(r)
        self._chunking = b"CHUNKING" in exts
        self._size = smtp.size_limit(r)
        hide: list[bytes] = []
        if self.policy.hide_pipelining:
            hide += [b"PIPELINING", b"PIPECONNECT"]  # PIPECONNECT (exim) presumes PIPELINING
        add: list[bytes] = []
        if self._tls_ours:
            hide.append(b"STARTTLS")  # ours, not the backend's
            if self._tls_offer and not self.tls:
                add.append(b"STARTTLS")
        if not hide and not add:
            return r.raw
        return smtp.drop_extension(r, *hide, add=tuple(add))

    def _too_slow(self, now: float) -> bool:
        """Close a client that trickles its message slower than min_data_rate bytes/s."""
        rate = self.policy.min_data_rate
        spent = now - self._data_start
        if rate <= 0 or spent < DATA_GRACE or self._data_bytes >= rate * spent:
            return False
        self._log("slow_data", bytes=self._data_bytes, elapsed=round(spent, 1))
        self._out.append(SendClient(TOO_SLOW))
        self._close("slow_data")
        return True
