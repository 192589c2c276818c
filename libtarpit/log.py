"""One logfmt line per event, and the parser that reads them back.

Public names:
  PROGRAM        the first word of every line ("tarpit-smtpd")
  escape_value   make a client-controlled value safe for a log line (capped, printable)
  format_line    build one line from ordered key/value pairs
  parse_line     read a line back into a dict (None if it is not one of ours)
  EventLog       holds the per-connection fields and writes one line per event

Line shape (stable, documented in docs/logs.md):
  tarpit-smtpd conn=… pid=… ip=… host=… class=… rule=… event=… [key=value …]
Values that contain spaces, quotes, '=' or are empty are double-quoted with
backslash escapes; bytes outside printable ASCII become '?'; values are capped
at MAX_VALUE characters so a client cannot flood the log.
"""

from __future__ import annotations

import re
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

if TYPE_CHECKING:  # typing costs ~5 ms at start-up, paid on every connection
    from typing import Iterable, Mapping, TextIO

PROGRAM = "tarpit-smtpd"
MAX_VALUE = 200

_PRINTABLE = re.compile(r"[^\x21-\x7e ]")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def escape_value(value: object) -> str:
    """Return `value` as a logfmt value: printable ASCII, capped, quoted when needed.

    Never fails: any object is turned into str first; floats get one decimal
    place (elapsed seconds), None becomes "-".
    """
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.1f}"
    elif isinstance(value, bytes):
        text = value.decode("latin-1")
    else:
        text = str(value)
    text = _PRINTABLE.sub("?", text)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
    if text == "" or _NEEDS_QUOTES.search(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_line(pairs: Iterable[tuple[str, object]]) -> str:
    """Return one log line (without newline) from ordered (key, value) pairs."""
    return PROGRAM + " " + " ".join(f"{k}={escape_value(v)}" for k, v in pairs)


_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_line(line: str) -> dict[str, str] | None:
    """Return the key/value pairs of one of our log lines, or None.

    Accepts the line with any prefix a log collector adds (multilog's
    `@4000…` TAI64N stamp, a syslog or journald header): everything before
    the first "tarpit-smtpd " is ignored.  Quoted values are unescaped.
    """
    at = line.find(PROGRAM + " ")
    if at < 0:
        return None
    out: dict[str, str] = {}
    for m in _PAIR.finditer(line, at + len(PROGRAM) + 1):
        key, raw = m.group(1), m.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out[key] = raw
    return out if "event" in out else None


class EventLog:
    """Writes one line per event with the connection's fields in front.

    `base` is an ordered mapping of the fields every line carries (conn, pid,
    ip, host, class, rule); `update()` changes them once the client is
    classified.  Writes are flushed at once so multilog sees each event when it
    happens, and a failing stream never raises into the SMTP session.
    """

    def __init__(self, stream: TextIO, base: Mapping[str, object]):
        self._stream = stream
        self._base: dict[str, object] = dict(base)

    def update(self, **fields: object) -> None:
        """Set or replace per-connection fields carried by later lines."""
        self._base.update(fields)

    def event(self, name: str, **fields: object) -> str:
        """Write the line for event `name` and return it (without newline)."""
        pairs = list(self._base.items()) + [("event", name)] + list(fields.items())
        line = format_line(pairs)
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass
        return line
