"""Sans-I/O SMTP: client command lines, backend replies, replies we build.

Public names:
  MAX_LINE        longest command line we buffer (RFC 5321 says 512; we allow more)
  Command         one parsed client command line (frozen)
  parse_command   bytes line -> Command; never raises
  LineSplitter    feed bytes, take complete lines; bounds a line's length
  Reply           one complete (possibly multi-line) reply (frozen)
  ReplyParser     feed backend bytes, take complete Replies
  reply           build reply bytes from a code and text lines
  mail_path       the address inside MAIL FROM:<...> / RCPT TO:<...>
  extensions      the keywords an EHLO reply advertises
  drop_extension  an EHLO reply without some extension keywords (e.g. PIPELINING), or with more
  size_limit      the SIZE an EHLO reply advertises
  printable       cap and escape client text before it is echoed anywhere
"""

from __future__ import annotations

from .text import printable as _printable
from .values import value

MAX_LINE = 4096
MAX_ECHO = 100


class Command(value("Command", "verb arg raw")):
    """A client command line: `verb` upper-cased ("" when there is none), `arg` the rest."""

    __slots__ = ()


def parse_command(line: bytes) -> Command:
    """Return the Command in `line` (with or without its CRLF).

    Never raises: bytes that are not ASCII are decoded as latin-1 so the
    verb comparison still works and the backend still gets the raw line.
    """
    text = line.rstrip(b"\r\n").decode("latin-1")
    verb, _, arg = text.strip().partition(" ")
    if not verb.isascii() or not verb.isalpha() or len(verb) > 16:
        return Command("", text.strip(), line)
    return Command(verb.upper(), arg.strip(), line)


class LineSplitter:
    """Accumulates bytes and hands out complete lines (ending in LF).

    `lines()` returns the complete lines and keeps the partial tail.  A line
    longer than MAX_LINE without LF is returned as `overlong` once (the bytes
    up to the next LF are discarded) so a client cannot grow our memory.
    """

    __slots__ = ("_buf", "_max", "_discarding")

    def __init__(self, max_line: int = MAX_LINE):
        self._buf = bytearray()
        self._max = max_line
        self._discarding = False

    def feed(self, data: bytes, front: bool = False) -> None:
        """Append `data` to the buffer (put it before what is buffered with `front`)."""
        if front:
            self._buf[:0] = data
        else:
            self._buf += data

    def next_line(self) -> tuple[bytes | None, bool]:
        """Return (line, overlong) for the next complete line, or (None, False) if none yet."""
        while True:
            nl = self._buf.find(b"\n")
            if self._discarding:
                if nl < 0:
                    self._buf.clear()
                    return None, False
                del self._buf[: nl + 1]
                self._discarding = False
                continue
            if nl < 0:
                if len(self._buf) > self._max:
                    self._buf.clear()
                    self._discarding = True
                    return b"", True
                return None, False
            if nl + 1 > self._max + 2:
                del self._buf[: nl + 1]
                return b"", True
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            return line, False

    def take(self, n: int | None = None) -> bytes:
        """Remove and return up to `n` buffered bytes (all when None), raw."""
        if n is None or n >= len(self._buf):  # the whole buffer: one copy, not a slice and a move
            out = bytes(self._buf)
            self._buf.clear()
            return out
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def __len__(self) -> int:
        return len(self._buf)


class Reply(value("Reply", "code lines raw")):
    """A complete reply: `code` (0 when the backend sent garbage), its lines, the raw bytes."""

    __slots__ = ()

    @property
    def positive(self) -> bool:
        """True for 2xx and 3xx."""
        return 200 <= self.code < 400

    def texts(self) -> list[bytes]:
        """The text of each line, without code and separator."""
        return [ln.rstrip(b"\r\n")[4:] for ln in self.lines]




class ReplyParser:
    """Accumulates backend bytes and hands out complete Replies.

    A reply ends with a line "ddd " or "ddd" (no separator).  A line that is
    not a reply line ends the reply too, with code 0, so a broken backend
    cannot make us buffer forever.
    """

    __slots__ = ("_split", "_lines")

    def __init__(self) -> None:
        self._split = LineSplitter(max_line=65536)
        self._lines: list[bytes] = []

    def feed(self, data: bytes) -> list[Reply]:
        """Append backend bytes; return the replies now complete, in order."""
        self._split.feed(data)
        out: list[Reply] = []
        while True:
            line, overlong = self._split.next_line()
            if line is None:
                return out
            if overlong:
                line = b"451 backend sent an overlong line\r\n"
            self._lines.append(line)
            numbered = line[:3].isdigit()  # "ddd", then "-" (more lines follow) or anything else
            if not numbered or line[3:4] != b"-":
                code = int(line[:3]) if numbered else 0
                lines = tuple(self._lines)
                self._lines = []
                out.append(Reply(code, lines, b"".join(lines)))

    def pending(self) -> bytes:
        """Bytes of an incomplete reply (lines so far plus the partial tail)."""
        return b"".join(self._lines) + self._split.take()


def printable(text: str | bytes, limit: int = MAX_ECHO) -> str:
    """Return client text capped to `limit` characters with non-printables as '?'.

    libtarpit.text.printable with the cap of text we echo in replies.
    """
    return _printable(text, limit)


def reply(code: int, *texts: str) -> bytes:
    """Return the bytes of a reply with `code` and one line per text ("ddd-" then "ddd ")."""
    texts = texts or ("",)
    out = []
    for i, t in enumerate(texts):
        sep = " " if i == len(texts) - 1 else "-"
        out.append(f"{code}{sep}{t}\r\n")
    return "".join(out).encode("ascii", "replace")


def mail_path(arg: str) -> str | None:
    """Return the address in a MAIL/RCPT argument ("FROM:<a@b> SIZE=1" -> "a@b").

    Returns "" for the null path "<>", None when the argument has no path.
    """
    _, colon, rest = arg.partition(":")
    if not colon:
        return None
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None
        return rest[1:end]
    token = rest.split(" ", 1)[0]
    return token or None


def extensions(r: Reply) -> list[bytes]:
    """The upper-cased extension keywords an EHLO reply advertises (its lines after the first)."""
    out = []
    for ln in r.lines[1:]:
        words = ln.rstrip(b"\r\n")[4:].split()
        if words:
            out.append(words[0].upper())
    return out


def size_limit(r: Reply) -> int:
    """The SIZE an EHLO reply advertises, in bytes; 0 when none (or no number)."""
    for ln in r.lines[1:]:
        words = ln.rstrip(b"\r\n")[4:].split()
        if len(words) == 2 and words[0].upper() == b"SIZE" and words[1].isdigit():
            return int(words[1])
    return 0


def drop_extension(r: Reply, *keywords: bytes, add: tuple[bytes, ...] = ()) -> bytes:
    """Return the raw bytes of EHLO reply `r` without the lines advertising any of `keywords`,
    and with one line for each of `add` at the end.

    Every line is rebuilt as code, separator, text, CRLF, so the last line keeps
    "ddd " and a short line ("250") keeps its CRLF.
    """
    texts = [r.lines[0].rstrip(b"\r\n")[4:]]
    for ln in r.lines[1:]:
        text = ln.rstrip(b"\r\n")[4:]
        words = text.split()
        if not words or words[0].upper() not in keywords:
            texts.append(text)
    texts += add
    code = str(r.code).encode()
    return b"".join(code + (b" " if i == len(texts) - 1 else b"-") + t + b"\r\n"
                    for i, t in enumerate(texts))
