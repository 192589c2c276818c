"""One logfmt line per event, and the parser that reads them back.

Public names:
  PROGRAM        the first word of every line ("tarpit-smtpd")
  PREFIX         regex of what a log collector may put before it (the one definition)
  prefix         the collector prefix at the start of a line, as a match (groups give the time)
  escape_value   make a client-controlled value safe for a log line (capped, printable)
  format_line    build one line from ordered key/value pairs
  parse_line     read a line back into a dict (None if it is not one of ours)
  EventLog       holds the per-connection fields and writes one line per event

Line shape (stable, documented in docs/logs.md):
  tarpit-smtpd conn=… pid=… ip=… host=… class=… rule=… event=… [key=value …]
Values that contain spaces, quotes, '=' or are empty are double-quoted with
backslash escapes; bytes outside printable ASCII become '?'; values are capped
at MAX_VALUE characters so a client cannot flood the log (libtarpit.text).

A line is ours only when "tarpit-smtpd " starts it or follows a PREFIX: the
backend's stderr shares the log and may quote the client ("from=<x
tarpit-smtpd event=tarpit_lost>"), so the word anywhere else means nothing.
"""

from __future__ import annotations

from libtarpit.text import printable

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection
if TYPE_CHECKING:
    import re
    from typing import Any, Iterable, Mapping, TextIO

# `re` (and the `enum` it loads, ~6 ms) is imported only by the reading side (prefix,
# parse_line): writing a line needs none, and a trusted client's exec path writes two.

PROGRAM = "tarpit-smtpd"
MAX_VALUE = 200

# What a log collector puts before a line, anchored at its start; stats.line_time
# reads the time from these groups.  In order, each part optional:
#   multilog t, s6-log t   "@400000006553f1000000000a "                  (tai)
#   then one time stamp:   "2026-11-01T12:00:00.5+01:00 " (journalctl -o short-iso,
#                          rsyslog, s6-log T "2026-11-01 12:00:00.123456789  ")
#                          or "Nov  1 12:00:00 " (syslog, journalctl, ts)  (date/time/zone, month/day/hms)
#   after a time stamp:    a syslog/journal header "host ident[pid]: " or "host ident: "
# Host and ident hold no space, ':' or brackets, so there is one way to read a line.
PREFIX = (
    r"(?:@(?P<tai>[0-9a-fA-F]{24}) +)?"
    r"(?:(?:(?P<date>\d{4}-\d{2}-\d{2})[T ]"
    r"(?P<time>\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)(?P<zone>Z|[+-]\d{2}:?\d{2})?"
    r"|(?P<month>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d{2}:\d{2}:\d{2})) +"
    r"(?:[^\s:\[\]]+ [^\s:\[\]]+(?:\[\d+\])?: )?)?"
)


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
    text = printable(text, MAX_VALUE)  # printable ASCII from here on: space is the only \s left
    if text == "" or " " in text or '"' in text or "=" in text or "\\" in text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_line(pairs: Iterable[tuple[str, object]]) -> str:
    """Return one log line (without newline) from ordered (key, value) pairs."""
    return PROGRAM + " " + " ".join(f"{k}={escape_value(v)}" for k, v in pairs)


_PAIR = r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S*)'


def prefix(line: str) -> re.Match[str]:
    """Return the match of PREFIX at the start of `line` (empty when there is none).

    Group "tai" holds a TAI64N label's 24 hex digits; "date", "time", "zone"
    an ISO-8601 stamp; "month", "day", "hms" a syslog stamp.  Never fails.
    """
    import re

    m = re.match(PREFIX, line)  # re caches the compiled pattern: nothing compiled at import
    assert m is not None  # every part is optional
    return m


def parse_line(line: str) -> dict[str, str] | None:
    """Return the key/value pairs of one of our log lines, or None.

    Ours means "tarpit-smtpd " at the start of the line or right after a
    collector's PREFIX; "tarpit-smtpd " anywhere else (inside a backend's
    line that quotes the client) does not count.  Quoted values are
    unescaped; a line without event= is not ours.  Never raises.
    """
    at = prefix(line).end()
    if not line.startswith(PROGRAM + " ", at):
        return None
    import re

    out: dict[str, str] = {}
    for m in re.finditer(_PAIR, line[at + len(PROGRAM) + 1:]):
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
        # key, value, key, value, ...: a listener holds thousands of these, and a dict is 0.3 KB
        self._base: tuple[object, ...] = tuple(x for pair in base.items() for x in pair)

    def update(self, **fields: object) -> None:
        """Set or replace per-connection fields carried by later lines."""
        base = dict(zip(self._base[::2], self._base[1::2]))
        base.update(fields)
        self._base = tuple(x for pair in base.items() for x in pair)

    def write(self, lines: Iterable[Any]) -> None:
        """Write each libtarpit.actions.Log value in `lines` as its line; never raises."""
        for line in lines:
            self.event(line.event, **dict(line.fields))

    def event(self, name: str, **fields: object) -> str:
        """Write the line for event `name` and return it (without newline)."""
        pairs = list(zip(self._base[::2], self._base[1::2])) + [("event", name)] + list(fields.items())
        line = format_line(pairs)
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass
        return line
