"""DNSWL: is this client's address in a DNS allow-list zone such as list.dnswl.org?

Public names:
  Result       the zone's answer as admission reads it: answer, trust level, error (immutable)
  parse_zone   "List.DNSWL.org." -> "list.dnswl.org"; ValueError for what is no DNS zone
  query_name   (ip, zone) -> the name to ask for (reversed octets, or nibbles for IPv6)
  judge        the A records (or an error token) a query returned -> Result
  trusts       Result + minimum trust level -> bool
  log_lines    Result -> the Log actions admission writes before `connect`
  lookup       one A query with a timeout -> Result (dnspython, imported only here)
  lookup_async the same for an asyncio driver (the listener), without a thread
  lookup_for, lookup_for_async   the two with the zone, timeout and server of a Config

An opt-in second opinion for clients S25R finds suspicious: a big sender whose
outbound names look dynamic, or change, is often listed in a DNSWL by address.
The query is the DNSBL one (RFC 5782): the IPv4 octets reversed, or the 32
nibbles of an IPv6 address reversed, in front of the zone, type A.
list.dnswl.org answers 127.0.C.T, where C is a category and T the trust level
(0 none, 1 low, 2 medium, 3 high); other DNSWL-style zones put a code in the
last byte too, and `trusts` compares that byte with the configured minimum.

An answer that is not a listing must never trust: dnswl.org answers 127.0.0.255
when it refuses the querier (a public resolver, too many queries); Spamhaus-style
zones use 127.255.255.x for the same; anything outside 127/8 is a resolver that
rewrites NXDOMAIN or a zone that is not what the postmaster thinks. All of these
are "blocked": not listed, and one error line.

DNS trouble never raises: a timeout, SERVFAIL or REFUSED is "not listed" with
the error token of libtarpit.rdns, so the client stays what S25R made it.
Importing this module loads neither dnspython nor ipaddress.
"""

from __future__ import annotations

from collections import namedtuple

from .actions import Log

TYPE_CHECKING = False  # typing costs ~4 ms; this module is imported per connection when on
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

__all__ = ["Result", "judge", "log_lines", "lookup", "lookup_async", "lookup_for", "lookup_for_async",
           "parse_zone", "query_name", "trusts"]

BLOCKED = "blocked"
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
# 32 nibbles and their dots take 64 characters in front of the zone; a name is at most 253
_MAX_ZONE = 253 - 64


class Result(namedtuple("Result", "answer level error", defaults=(None, None, None))):
    """What the zone said about one address.

    answer  the A record that decided ("127.0.9.2"; for "blocked", the offending one), or None
    level   the last byte of a listing's answer (dnswl.org's trust level), None when not listed
    error   None when the zone answered (listed or NXDOMAIN); else "blocked" (an answer that
            is a refusal, see the module docstring) or rdns's DNS error token ("timeout",
            "servfail", "refused", "unreachable", "badresponse", "noconfig", ...)
    """

    __slots__ = ()

    @property
    def listed(self) -> bool:
        """True when the zone lists the address (at any level)."""
        return self.error is None and self.level is not None


def parse_zone(text: str) -> str:
    """Return `text` as a zone: lower case, no trailing dot.

    Raises ValueError for an empty name, an empty label ("a..b", ".a"), a label over 63
    characters, a character other than letters, digits, "-" and "_", or a zone too long
    to hold an IPv6 query name (over 189 characters).
    """
    zone = text.strip().lower().removesuffix(".")
    labels = zone.split(".")
    if not zone or len(zone) > _MAX_ZONE or any(
            not 0 < len(label) <= 63 or not _LABEL_CHARS.issuperset(label) for label in labels):
        raise ValueError(f"not a DNS zone: {text!r}")
    return zone


def query_name(ip: str, zone: str) -> str:
    """Return the absolute name to query for `ip` under `zone` (ends with a dot).

    IPv4: "192.0.2.25" -> "25.2.0.192.ZONE.". IPv6: the 32 nibbles of the full address,
    last first, dot-separated (as in ip6.arpa). An IPv4-mapped address (::ffff:a.b.c.d,
    what a dual-stack socket reports) is asked as its IPv4 address.
    Raises ValueError when `ip` is not an IP address or `zone` is not a zone.
    """
    import ipaddress

    try:
        addr = ipaddress.ip_address(ip.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"not an IP address: {ip!r}") from None
    zone = parse_zone(zone)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.version == 4:
        labels = str(addr).split(".")[::-1]
    else:
        labels = list(f"{int(addr):032x}")[::-1]  # int() drops any %scope
    return ".".join(labels) + f".{zone}."


def _quad(text: str) -> tuple[int, int, int, int] | None:
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])


def _refusal(quad: tuple[int, int, int, int] | None) -> bool:
    """An answer that says "I will not tell you", not "listed"."""
    return (quad is None or quad[0] != 127 or quad == (127, 0, 0, 255)
            or quad[1:3] == (255, 255))


def judge(addresses: Iterable[str], error: str | None = None) -> Result:
    """Return the Result for the A records `addresses` a query returned (or its `error`).

    No addresses: not listed. Any refusal among them (127.0.0.255, 127.255.255.x, an
    address outside 127/8 or no IPv4 address at all): "blocked", even beside a listing,
    since a zone that refuses this querier may answer anything. Otherwise the listing
    with the highest last byte. Never raises.
    """
    if error is not None:
        return Result(error=error)
    best: tuple[int, str] | None = None
    for text in addresses:
        quad = _quad(str(text))
        if _refusal(quad):
            return Result(answer=str(text), error=BLOCKED)
        if best is None or quad[3] > best[0]:
            best = (quad[3], str(text))
    return Result() if best is None else Result(answer=best[1], level=best[0])


def trusts(result: Result, min_level: int) -> bool:
    """True when `result` is a listing whose level is at least `min_level`."""
    return result.listed and result.level >= min_level


def log_lines(result: Result) -> tuple[Log, ...]:
    """The lines admission writes for a query that was made.

    A listing (any level): `dnswl answer=127.0.9.2 level=2`. DNS trouble or a refusal:
    `error what=dnswl detail=timeout` (`detail="blocked 127.0.0.255"`). Not listed: nothing.
    """
    if result.error == BLOCKED:
        return (Log("error", (("what", "dnswl"), ("detail", f"{BLOCKED} {result.answer}"))),)
    if result.error is not None:
        return (Log("error", (("what", "dnswl"), ("detail", result.error))),)
    if result.listed:
        return (Log("dnswl", (("answer", result.answer), ("level", result.level))),)
    return ()


def lookup(ip: str, zone: str, timeout: float, *, nameservers: list[str] | None = None,
           port: int = 53) -> Result:
    """Ask `zone` about `ip` (one A query, at most about `timeout` seconds); return the Result.

    `nameservers` (IP addresses) and `port` replace /etc/resolv.conf. A timeout, SERVFAIL,
    REFUSED or a resolver that cannot be set up is a Result with that error token (the
    client is not listed); `timeout <= 0` is "timeout" without a query.
    Raises ValueError when `ip` is not an IP address, `zone` is not a zone, or `timeout`
    is NaN or infinite; never raises for DNS trouble.
    """
    qname, done = _prepare(ip, zone, timeout)
    if done is not None:
        return done
    import dns.resolver

    resolver, done = _setup(dns.resolver.Resolver, timeout, nameservers, port)
    if done is not None:
        return done
    try:
        answer = resolver.resolve(qname, "A", lifetime=timeout, raise_on_no_answer=False)
    except Exception as e:  # noqa: BLE001 - _answered re-raises what is not DNS trouble
        return _answered(None, e)
    return _answered(answer, None)


async def lookup_async(ip: str, zone: str, timeout: float, *, nameservers: list[str] | None = None,
                       port: int = 53) -> Result:
    """lookup() for an asyncio driver (the listener): the same query and Result, without a thread.

    Raises ValueError as lookup() does; never raises for DNS trouble.
    """
    qname, done = _prepare(ip, zone, timeout)
    if done is not None:
        return done
    import dns.asyncresolver

    resolver, done = _setup(dns.asyncresolver.Resolver, timeout, nameservers, port)
    if done is not None:
        return done
    try:
        answer = await resolver.resolve(qname, "A", lifetime=timeout, raise_on_no_answer=False)
    except Exception as e:  # noqa: BLE001 - _answered re-raises what is not DNS trouble
        return _answered(None, e)
    return _answered(answer, None)


def _prepare(ip: str, zone: str, timeout: float) -> tuple[str, Result | None]:
    import math

    qname = query_name(ip, zone)
    if math.isnan(timeout) or math.isinf(timeout):
        raise ValueError(f"timeout must be a finite number of seconds: {timeout!r}")
    return qname, (Result(error="timeout") if timeout <= 0 else None)


def _setup(make: Any, timeout: float, nameservers: list[str] | None, port: int) -> tuple[Any, Result | None]:
    """A resolver set up as libtarpit.rdns sets one up (no cache, one lifetime), or the Result of failing to."""
    from .rdns import _resolver  # one resolver set-up and one set of error tokens for both lookups

    resolver, error = _resolver(timeout, nameservers, port, make)
    return resolver, (Result(error=error) if error else None)


def _answered(answer: Any, error: BaseException | None) -> Result:
    """The Result of a resolve() that returned `answer` or raised `error` (re-raised unless DNS trouble)."""
    from .rdns import _answer

    rrset, token = _answer(answer, error)
    if token:
        return Result(error=token)
    if rrset is None:
        return Result()
    return judge(rr.address for rr in rrset)


def lookup_for(cfg: Any, ip: str) -> Result:
    """lookup() of `ip` in `cfg.dnswl_zone` within `cfg.dnswl_timeout`, at `cfg.dnswl_server` if set.

    Raises ValueError as lookup() does (a Config from load_config has a valid zone and server).
    """
    return lookup(ip, cfg.dnswl_zone, cfg.dnswl_timeout, **_server(cfg))


async def lookup_for_async(cfg: Any, ip: str) -> Result:
    """lookup_async() with the zone, timeout and server of `cfg`, as lookup_for()."""
    return await lookup_async(ip, cfg.dnswl_zone, cfg.dnswl_timeout, **_server(cfg))


def _server(cfg: Any) -> dict[str, Any]:
    if not cfg.dnswl_server:
        return {}
    from .rdns import parse_server

    servers, port = parse_server(cfg.dnswl_server)
    return {"nameservers": servers, "port": port}
