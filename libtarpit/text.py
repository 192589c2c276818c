"""The one escaper for client-controlled text (rblsmtpd: capped, non-printables as '?').

Public names:
  printable   text capped to a limit, every character outside printable ASCII as '?'

Used for anything a client (or a log line a client may have shaped) chose
before it reaches a reply, a log line or a terminal: smtp replies,
log.escape_value (which adds logfmt quoting on top), tarpitctl output.
Imported on every connection: only `re`, compiled on first use.
"""

from __future__ import annotations

_UNPRINTABLE = r"[^\x20-\x7e]"  # keep: space and '!'..'~'; re caches the compiled form


def printable(text: str | bytes, limit: int) -> str:
    """Return `text` cut to `limit` characters, each one outside ' '..'~' as '?', plus '...' if cut.

    Bytes are read as latin-1 (one character per byte, so the limit counts
    bytes and a byte is never half of a '?').  Tabs, CR, LF, ESC and every
    non-ASCII character become '?'.  Only the first `limit` characters are
    scanned, so a huge input costs no more than a short one.
    Raises ValueError if `limit` is negative.
    """
    if limit < 0:
        raise ValueError(f"printable: negative limit {limit}")
    head = text[:limit]
    if isinstance(head, bytes):
        head = head.decode("latin-1")
    if not (head.isascii() and head.isprintable()):  # the common case needs no `re` (and no enum)
        import re

        head = re.sub(_UNPRINTABLE, "?", head)
    return head + "..." if len(text) > limit else head
