"""The sans-I/O relay under the session: reply order, message framing, back pressure.

Public names:
  MAX_BUFFER   client bytes held while the session cannot act on them (then reading stops)
  Pending      one reply the client is owed, in command order
  Relay        client line buffer, backend reply parser, the queue of owed replies,
               DATA and BDAT framing

The relay decides nothing.  The session tells it to forward a command (`forward`),
to answer one itself (`answer`), or to pass message bytes (`body`, `chunk`); the
relay keeps every reply in command order, matches each backend reply to the
command it answers (`replies`), and appends SendClient/SendBackend actions to the
list it was given.  What a reply *means* for the transaction is the session's
business: state follows the backend's replies, never the client's lines.

Framing rules that keep commands from being smuggled past the checks:
- only <CRLF>.<CRLF> ends DATA (qmail-smtpd and aiosmtpd ignore a bare-LF dot line);
- a BDAT chunk is exactly the size the session parsed and accepted.
"""

from __future__ import annotations


from . import smtp
from .actions import SendBackend

MAX_BUFFER = 65536
DATA_END = b"\r\n.\r\n"


class Pending:
    """One reply the client is owed: a backend reply of `kind`, or our own `local` bytes."""

    __slots__ = ("kind", "local", "close", "arg")

    def __init__(self, kind: str, local: bytes | None = None, close: str = "", arg: str = ""):
        self.kind = kind      # banner helo ehlo mail rcpt data dot bdat bdat_last auth auth_data
        #                       starttls rset quit other, or "local"
        self.local = local    # our own reply bytes
        self.close = close    # close after sending this local reply, with this reason
        self.arg = arg        # what the session needs back with the reply (the RCPT address)


class Relay:
    """Client bytes in, backend bytes in; SendClient/SendBackend appended to `out`."""

    # slots: a held connection's state is counted in KB by the listener (bench/serve_memory.py)
    __slots__ = ('out', 'inbuf', 'queue', '_parser', '_tail', 'chunk_left', 'chunk_discard', '_owed')

    def __init__(self, out: list):
        self.out = out
        self.inbuf = smtp.LineSplitter()
        # a list, not a deque: an empty deque costs ~600 bytes per held client, and the queue is
        # a few commands deep (pipelining is bounded by MAX_BUFFER)
        self.queue: list[Pending] = []
        self._parser = smtp.ReplyParser()
        self._tail = b"\r\n"
        self.chunk_left = 0
        self.chunk_discard = False
        self._owed: dict[str, int] = {}  # backend replies owed, by kind: owed() is O(kinds), not O(queue)

    # --- commands ---------------------------------------------------------

    def forward(self, raw: bytes, kind: str, arg: str = "") -> None:
        """Send command `raw` to the backend and owe the client its reply."""
        self.queue.append(Pending(kind, arg=arg))
        self._owed[kind] = self._owed.get(kind, 0) + 1
        self.out.append(SendBackend(raw))

    def expect(self, kind: str) -> None:
        """Owe the client a backend reply it did not ask for (the banner)."""
        self.queue.append(Pending(kind))
        self._owed[kind] = self._owed.get(kind, 0) + 1

    def answer(self, data: bytes, close: str = "") -> None:
        """Owe the client our own reply `data` (sent when every earlier reply has gone)."""
        self.queue.append(Pending("local", data, close))

    def owed(self, *kinds: str) -> bool:
        """True while the backend owes a reply (of one of `kinds`, when given)."""
        if not kinds:
            return any(self._owed.values())
        return any(self._owed.get(k) for k in kinds)

    def ready(self) -> list[Pending]:
        """Remove and return the local replies now at the head of the queue."""
        out = []
        while self.queue and self.queue[0].local is not None:
            out.append(self.queue.pop(0))
        return out

    # --- backend side -------------------------------------------------------

    def replies(self, data: bytes):
        """Feed backend bytes; yield each complete reply with the command it answers.

        A generator on purpose: the caller must send the local replies now at the
        head of the queue (`ready`) before the next backend reply is matched, or a
        local reply queued between two forwarded commands would be skipped over.
        A reply nobody asked for (a backend that talks out of turn) is paired
        with Pending("other") and changes nothing.
        """
        for r in self._parser.feed(data):
            if self.queue and self.queue[0].local is None:
                p = self.queue.pop(0)
                self._owed[p.kind] -= 1
                yield p, r
            else:
                yield Pending("other"), r

    def backend_tail(self) -> bytes:
        """Bytes of a reply the backend did not finish before it closed."""
        return self._parser.pending()

    # --- message framing ---------------------------------------------------

    def start_body(self) -> None:
        """The backend said 354: client bytes are message bytes from now on."""
        self._tail = b"\r\n"

    def body(self) -> bool:
        """Pass buffered message bytes to the backend; True once <CRLF>.<CRLF> went through."""
        data = self.inbuf.take()
        # a message is megabytes in reads of up to 256 KB: look for the end in the read itself,
        # and join only the last bytes before it to its first ones (an end split across reads)
        tail = self._tail
        found = (tail + data[:4]).find(DATA_END)
        if found >= 0:
            cut = found + 5 - len(tail)
        else:
            found = data.find(DATA_END)
            if found < 0:
                if data:
                    self.out.append(SendBackend(data))
                self._tail = data[-4:] if len(data) >= 4 else (tail + data)[-4:]
                return False
            cut = found + 5
        self.out.append(SendBackend(data[:cut]))
        self.inbuf.feed(data[cut:], front=True)
        self.queue.append(Pending("dot"))
        self._owed["dot"] = self._owed.get("dot", 0) + 1
        return True

    def start_chunk(self, size: int, discard: bool = False) -> None:
        """The next `size` client bytes are a BDAT chunk (passed on, or dropped with `discard`)."""
        self.chunk_left = size
        self.chunk_discard = discard

    def chunk(self) -> bool:
        """Pass (or drop) buffered chunk bytes; True once the whole chunk went."""
        data = self.inbuf.take(self.chunk_left)
        self.chunk_left -= len(data)
        if data and not self.chunk_discard:
            self.out.append(SendBackend(data))
        return self.chunk_left == 0
