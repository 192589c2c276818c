"""taRgrey (seed 001): S25R + tarpitting + greylisting, as a state machine over a store.

Public names:
  GreylistParams   the knobs (mode, delay, retry_count, auto_whitelist, expire, key, prefixes, timeout)
  params_for       GreylistParams for one client class from a libtarpit.config.Config (None when off)
  Decision         what `check` answers: action tarpit | defer | pass, a reason token, retry_after
  client_key       the client part of a triple: its /24 (IPv6 /64), or in "name" mode its
                   forward-confirmed reverse name minus the first label
  normalize_address  how senders and recipients are compared (lower case, no <>, capped)
  Greylist         check / tarpit_lost / tarpit_passed / delivered / whitelist_add / purge
  defer_text       the text after "450 4.7.1 <RCPT>: " for a defer decision
  Store            the protocol both stores implement
  open_store       "redis://..." -> RedisStore; "sqlite:///path" or a plain path -> SQLiteStore
  Record, View, Hit, SQLiteStore, RedisStore   re-exported from libtarpit.greystore

The transitions, written down only here (Greylist.check and the three event methods
apply them; the stores apply each update atomically):

  check(client, sender, rcpt), first rule that matches:
    1  the client is whitelisted                          -> pass   whitelisted
    2  mode "tarpit": the triple passed before            -> pass   sat_through | delay_passed
                      otherwise                           -> tarpit first_contact
    3  the triple passed before (sat through, or waited)  -> pass   sat_through | delay_passed
    4  the triple is known, or the client dropped during an earlier tarpit, or mode is
       "greylist", or a normal client under the plain triplet greylist:
         hit the triple (created when new; a retry after the delay counts, an early one not)
         passed now (count >= retry_count; 1 for normal)  -> pass   delay_passed
         created by this check                            -> defer  new_triple  (retry_after = delay)
         first seen + delay still ahead                   -> defer  too_early   (retry_after = the rest)
         otherwise (delay passed, too few retries)        -> defer  retry_count (retry_after = 0)
    5  otherwise (first contact of a suspicious client)   -> tarpit first_contact
  tarpit_lost:   triple recorded (first seen = now, not counted); the client's tarpit record +1
  tarpit_passed: triple marked passed
  delivered:     the client's tarpit record removed; client whitelisted until now + auto_whitelist

Every record is forgotten `expire` seconds after it was last seen.  Store trouble raises
libtarpit.errors.StoreError from every method that touches the store; the caller fails open.
"""

from __future__ import annotations

import math
import re

from libtarpit.values import value

TYPE_CHECKING = False  # typing and dataclasses would add ~4 MB to every tarpitted connection
if TYPE_CHECKING:
    import ipaddress
    from typing import Protocol

from libtarpit.errors import StoreError
from libtarpit.greystore import (
    TARPIT,
    TRIPLE,
    WHITE,
    Hit,
    Record,
    RedisStore,
    SQLiteStore,
    View,
    sqlite_path,
)

__all__ = [
    "GreylistParams", "params_for", "Decision", "client_key", "normalize_address", "Greylist", "defer_text",
    "Store", "open_store", "Record", "View", "Hit", "SQLiteStore", "RedisStore", "StoreError",
]

MODES = ("targrey", "tarpit", "greylist")
KEY_MODES = ("net", "name")
ACTIONS = ("tarpit", "defer", "pass")
MAX_ADDRESS = 256


_PARAM_DEFAULTS = {
    "mode": "targrey", "delay": 1200, "retry_count": 2, "auto_whitelist": 3600,
    "expire": 35 * 86400, "key": "net", "ipv4_prefix": 24, "ipv6_prefix": 64,
    "timeout": 0.5, "greylist_normal": False,
}


class GreylistParams(value("GreylistParams", list(_PARAM_DEFAULTS), tuple(_PARAM_DEFAULTS.values()))):
    """Greylist knobs; defaults are seed 001's postgrey options.

    mode            "targrey" (tarpit first, greylist those who dropped), "tarpit" (only
                    tarpit, never defer), "greylist" (no tarpit, plain greylist for suspicious)
    delay           seconds a dropped client must wait before a retry counts (--delay)
    retry_count     retries after the delay needed to pass (--retry-count; 2: the second passes)
    auto_whitelist  seconds a client that delivered skips tarpit and greylist
    expire          seconds a record lives after it was last seen (postgrey --max-age)
    key             "net" (client /24, /64) or "name" (confirmed reverse name minus first label)
    ipv4_prefix, ipv6_prefix   the network sizes of "net" keys
    timeout         seconds a store operation may take before StoreError
    greylist_normal also greylist normal (non-suspicious) clients by triple, postgrey style
    """

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args, **kwargs)
        self._check()
        return self

    def _check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"greylist mode must be one of {', '.join(MODES)}: {self.mode!r}")
        if self.key not in KEY_MODES:
            raise ValueError(f"greylist key must be one of {', '.join(KEY_MODES)}: {self.key!r}")
        if not 0 <= self.ipv4_prefix <= 32 or not 0 <= self.ipv6_prefix <= 128:
            raise ValueError("greylist prefixes must be 0-32 (IPv4) and 0-128 (IPv6)")
        if min(self.delay, self.auto_whitelist, self.retry_count) < 0 or self.expire <= 0 or self.timeout <= 0:
            raise ValueError("greylist delay, retry_count, auto_whitelist must be >= 0; expire, timeout > 0")


def params_for(cfg, cls: str, *, mode: str | None = None) -> GreylistParams | None:
    """Return the greylist knobs for a client of class `cls`, or None when its greylist is "off".

    `cfg` is a libtarpit.config.Config: the mode is cfg.policy(cls).greylist, everything else
    the cfg.greylist_* globals; greylist_normal is on for a class other than "suspicious" in
    mode "greylist".  `mode` replaces the class's mode (tarpitctl passes "targrey" to build
    keys for a class whose greylist is off).  The wrapper and tarpitctl both build their
    parameters here, so the keys one writes are the keys the other reads.
    Raises ValueError when the knobs are out of range (Config has checked them already).
    """
    if mode is None:
        mode = cfg.policy(cls).greylist
    if mode == "off":
        return None
    return GreylistParams(
        mode=mode, delay=cfg.greylist_delay, retry_count=cfg.greylist_retries,
        auto_whitelist=cfg.greylist_whitelist, expire=cfg.greylist_expire, key=cfg.greylist_key,
        ipv4_prefix=cfg.greylist_ipv4_prefix, ipv6_prefix=cfg.greylist_ipv6_prefix,
        timeout=cfg.greylist_timeout, greylist_normal=cls != "suspicious" and mode == "greylist",
    )


class Decision(value("Decision", "action reason retry_after", (None,))):
    """The answer of Greylist.check.

    action       "tarpit" (sleep before answering), "defer" (450), "pass"
    reason       short token for the log: first_contact, new_triple, too_early, retry_count,
                 delay_passed, sat_through, whitelisted, off
    retry_after  seconds until a retry can pass (defer only), for the 450 text
    """

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args, **kwargs)
        if self.action not in ACTIONS:
            raise ValueError(f"Decision action must be one of {', '.join(ACTIONS)}: {self.action!r}")
        return self


# Second-level labels that registries hand out under two-letter country codes: "x.co.jp"
# minus its first label would key on a whole registry.
_REGISTRY_LABELS = frozenset("ac co com ed edu go gov gr lg mil ne net or org".split())


def client_key(ip: str, confirmed_name: str | None, params: GreylistParams) -> str:
    """Return the client part of a greylist triple.

    "net" mode, and the fallback of "name" mode: the client's network, "192.0.2.0/24" or
    "2001:db8:1:2::/64" (IPv4-mapped IPv6 counts as IPv4).  "name" mode: the forward-confirmed
    reverse name minus its first label ("mail1.example.net" -> "example.net"), when the name
    has >= 3 labels, does not leave only a registry ("x.co.jp"), and its first label does not
    spell the IP (a dynamic-looking name would lump a whole access pool together).
    Raises ValueError when `ip` is not an IP address.
    """
    if params.key == "net" or not confirmed_name:
        net = _ipv4_network(ip.strip(), params.ipv4_prefix)
        if net is not None:
            return net
    import ipaddress

    addr = ipaddress.ip_address(ip.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if params.key == "name" and confirmed_name:
        name = _name_key(confirmed_name, addr)
        if name is not None:
            return name
    prefix = params.ipv4_prefix if addr.version == 4 else params.ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def _ipv4_network(ip: str, prefix: int) -> str | None:
    """"192.0.2.77", 24 -> "192.0.2.0/24" without importing ipaddress (1.8 ms and 0.25 MB on every
    greylisted connection); None for anything but a dotted quad ipaddress would accept."""
    parts = ip.split(".")
    if len(parts) != 4 or not all(p.isdigit() and p.isascii() and (p == "0" or p[0] != "0") and len(p) <= 3
                                  for p in parts):
        return None
    n = 0
    for p in parts:
        if int(p) > 255:
            return None
        n = n << 8 | int(p)
    n &= (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}/{prefix}"


def _name_key(name: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    labels = name.strip().rstrip(".").lower().split(".")
    if len(labels) < 3 or not all(labels):
        return None
    rest = labels[1:]
    if len(rest) == 2 and len(rest[1]) == 2 and rest[0] in _REGISTRY_LABELS:
        return None
    if addr.version == 4:
        octets = set(str(addr).split("."))
        if len(octets & {d.lstrip("0") or "0" for d in re.findall(r"\d+", labels[0])}) >= 2:
            return None
    return ".".join(rest)


def normalize_address(address: str) -> str:
    """Return an envelope address as the triple stores it: stripped, without <>, lower case,
    capped at MAX_ADDRESS characters ("" is the null sender)."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text.lower()[:MAX_ADDRESS]


def defer_text(decision: Decision) -> str:
    """Return the text of the 450 reply to a defer decision, after "450 4.7.1 <RCPT>: ".

    The full reply, the only greylist reply text there is, is built by the session as

        smtp.reply(450, f"4.7.1 <{smtp.printable(rcpt)}>: {defer_text(decision)}")
        -> b"450 4.7.1 <bob@example.jp>: Greylisted, please try again in 1200 seconds\r\n"

    The seconds are retry_after rounded up (a retry one second early would be deferred
    again); "1 second" in the singular; with no time left (retry_count: the delay has
    passed, more retries are needed) or none known, "Greylisted, please try again later".
    """
    wait = decision.retry_after or 0
    if wait > 0:
        n = math.ceil(wait)
        return f"Greylisted, please try again in {n} second{'s' if n != 1 else ''}"
    return "Greylisted, please try again later"


if TYPE_CHECKING:
    class Store(Protocol):
        """What Greylist and tarpitctl need from a store; every method may raise StoreError."""

        def view(self, client: str, sender: str, rcpt: str, now: float) -> View: ...
        def hit(self, table: str, client: str, sender: str, rcpt: str, now: float, hit: Hit) -> tuple[Record, bool]: ...
        def remove(self, table: str, client: str, sender: str = "", rcpt: str = "") -> int: ...
        def delete(self, client: str, sender: str | None = None, rcpt: str | None = None) -> int: ...
        def records(self, now: float | None = None) -> list[Record]: ...
        def purge(self, now: float) -> int: ...
        def close(self) -> None: ...


def open_store(url: str, *, timeout: float) -> Store:
    """Return the store named by `url`, not yet connected (errors surface on first use).

    "redis://", "rediss://", "unix://" -> RedisStore; "sqlite:///path" or a plain path -> SQLiteStore.
    Raises StoreError for an empty url.
    """
    if not url or not url.strip():
        raise StoreError("no greylist store given")
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, timeout=timeout)
    return SQLiteStore(sqlite_path(url), timeout=timeout)


class Greylist:
    """The taRgrey state machine over a store (see the module docstring for the table).

    Every method takes the caller's clock `now` (seconds since the epoch) and raises
    StoreError when the store fails; none of them blocks longer than the store timeout
    allows (SQLite busy timeout, Redis socket timeouts).
    """

    def __init__(self, store: Store, params: GreylistParams):
        self.store = store
        self.params = params

    def check(self, client: str, sender: str, rcpt: str, now: float, *, suspicious: bool = True) -> Decision:
        """Return what to do at RCPT for this client and triple (tarpit, defer or pass).

        `suspicious` False means a normal client: it passes without a store lookup unless
        params.greylist_normal is on, in which case the plain triplet greylist applies
        (postgrey's rule: the first retry after the delay passes).
        Raises StoreError.
        """
        p = self.params
        if not suspicious and not p.greylist_normal:
            return Decision("pass", "off")
        sender, rcpt = normalize_address(sender), normalize_address(rcpt)
        view = self.store.view(client, sender, rcpt, now)
        if view.white is not None:
            return Decision("pass", "whitelisted")
        if view.triple is not None and view.triple.passed:
            rec, _ = self.store.hit(TRIPLE, client, sender, rcpt, now, Hit(ttl=p.expire))
            return Decision("pass", self._pass_reason(rec))
        if suspicious and p.mode == "tarpit":
            return Decision("tarpit", "first_contact")
        greylisting = not suspicious or p.mode == "greylist"
        if view.triple is None and view.tarpit is None and not greylisting:
            return Decision("tarpit", "first_contact")
        return self._greylist(client, sender, rcpt, now, p.retry_count if suspicious else 1)

    def _greylist(self, client: str, sender: str, rcpt: str, now: float, retry_count: int) -> Decision:
        p = self.params
        hit = Hit(ttl=p.expire, count_before=now - p.delay, pass_at=max(retry_count, 1))
        rec, created = self.store.hit(TRIPLE, client, sender, rcpt, now, hit)
        if rec.passed:
            return Decision("pass", "delay_passed")
        if created:
            return Decision("defer", "new_triple", float(p.delay))
        if rec.first + p.delay > now:
            return Decision("defer", "too_early", rec.first + p.delay - now)
        return Decision("defer", "retry_count", 0.0)

    def _pass_reason(self, rec: Record) -> str:
        return "delay_passed" if rec.count >= max(self.params.retry_count, 1) else "sat_through"

    def tarpit_lost(self, client: str, sender: str, rcpt: str, now: float) -> None:
        """Record that the client dropped during the tarpit: its triple and its tarpit record.

        Raises StoreError.
        """
        sender, rcpt = normalize_address(sender), normalize_address(rcpt)
        self.store.hit(TRIPLE, client, sender, rcpt, now, Hit(ttl=self.params.expire))
        self.store.hit(TARPIT, client, "", "", now, Hit(ttl=self.params.expire, add=1))

    def tarpit_passed(self, client: str, sender: str, rcpt: str, now: float) -> None:
        """Record that the client sat through the tarpit: its triple passes from now on.

        Raises StoreError.
        """
        sender, rcpt = normalize_address(sender), normalize_address(rcpt)
        self.store.hit(TRIPLE, client, sender, rcpt, now, Hit(ttl=self.params.expire, set_passed=True))

    def delivered(self, client: str, now: float) -> None:
        """Record that the client reached DATA: clear its tarpit record, auto-whitelist it.

        Nothing is whitelisted when params.auto_whitelist is 0.  Raises StoreError.
        """
        self.store.remove(TARPIT, client)
        if self.params.auto_whitelist > 0:
            self.store.hit(WHITE, client, "", "", now, Hit(ttl=self.params.auto_whitelist, add=1))

    def whitelist_add(self, client: str, seconds: float, now: float) -> Record:
        """Whitelist `client` until at least now + seconds; return its record.  Raises StoreError."""
        rec, _ = self.store.hit(WHITE, client, "", "", now, Hit(ttl=seconds, add=1))
        return rec

    def purge(self, now: float) -> int:
        """Delete expired records; return how many.  Raises StoreError."""
        return self.store.purge(now)
