"""Who is connecting: the client's class, decided once at start.

Public names:
  Client     ip, host, class, S25R rule, reason, greylist key (immutable)
  classify   environment facts + S25R verdict -> Client

The precedence is written here and nowhere else: TARPIT_CLASS (set per client
by tcprules) wins, then RELAYCLIENT, then the allow-list, then the S25R rules.
A named tuple, not a dataclass: this is imported on every connection, fast
path included (see libtarpit.config on start-up cost).
"""

from __future__ import annotations

from collections import namedtuple
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

if TYPE_CHECKING:
    from typing import Any


class Client(namedtuple("Client", "ip host cls rule reason key", defaults=(None, "", ""))):
    """The connecting client as classified once at start.  Change with `._replace()`."""

    __slots__ = ()


def classify(ip: str, host: str | None, *, relayclient: bool, verdict: Any,
             force_class: str | None = None, key: str = "") -> Client:
    """Return the Client with its class: trusted, suspicious or normal.

    `verdict` is an s25r.Verdict: an allow-listed client is trusted, an S25R
    match is suspicious.  RELAYCLIENT makes a client trusted (qmail's own
    notion of a client we relay for); `force_class` (TARPIT_CLASS, set per
    client by tcprules) wins over everything.  Never raises.
    """
    rule = verdict.rule if verdict is not None else None
    if force_class:
        return Client(ip, host, force_class, rule, "forced", key)
    if relayclient:
        return Client(ip, host, "trusted", rule, "relayclient", key)
    if verdict is not None and verdict.allowed_by:
        return Client(ip, host, "trusted", rule, "allowlist", key)
    if verdict is not None and verdict.suspicious:
        return Client(ip, host, "suspicious", rule, f"s25r{rule}", key)
    return Client(ip, host, "normal", rule, "", key)
