"""Forward-confirmed reverse DNS: the client's name, only if it resolves back to the client.

Public names:
  confirmed_name  PTR of an IP, kept only when the name's A/AAAA includes that IP -> (name, error)
  name_async      the same for an asyncio driver (the listener), and with confirm=False the
                  first PTR name alone, as `tcpserver -h` without -p takes it
  parse_server    "host" / "host:port" / "[v6]:port" -> (nameservers, port) for confirmed_name

The queries are asked by one generator (`_steps`) that yields each query and
is sent its answer, driven by a blocking loop or an asyncio one: the rules are
written once for both drivers, and no thread is needed in the listener (a thread
per lookup reserves its stack's address space, which `softlimit -m` refuses).

Under `tcpserver -H` TCPREMOTEHOST is never set, so every client would look
like S25R rule 0 ("no reverse name").  With TARPIT_RDNS=1 the wrapper calls
`confirmed_name` itself.  It does what `tcpserver -h -p` (paranoid) does: a PTR
name is believed only when one of the addresses it resolves to is the client's
own, because whoever controls an IP's reverse zone can name it
`mail-x.google.com`.

DNS trouble never raises: a lookup that could not finish within `timeout`
seconds (one deadline shared by the PTR query and every forward query) returns
`(None, "timeout")`, and the caller treats the client as having no name.
dnspython is imported inside the functions so a wrapper with TARPIT_RDNS unset
does not pay for it.

The deadline is kept on the caller's clock (`clock`, time.monotonic by default), so a
test can run it on a fake one; nothing here reads the wall clock.
"""

from __future__ import annotations

import ipaddress
import math
import time

TYPE_CHECKING = False  # typing costs ~4 ms, and this module is imported per connection
if TYPE_CHECKING:
    from typing import Any, Callable

    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["confirmed_name", "name_async", "parse_server"]


def confirmed_name(ip: str, timeout: float, *, nameservers: list[str] | None = None,
                   port: int = 53, clock: Callable[[], float] = time.monotonic) -> tuple[str | None, str | None]:
    """Return (name, error) for the client address `ip`.

    name: the first PTR name of `ip` (lowercase, no trailing dot) whose A
    records (AAAA for an IPv6 `ip`) include `ip`; None when there is no PTR,
    the PTR names do not resolve back, or the lookup failed.  An IPv4-mapped
    IPv6 address (::ffff:a.b.c.d) is looked up as the IPv4 address.
    error: None when the DNS answered (NXDOMAIN and "not confirmed" included);
    otherwise a short token ("timeout", "servfail", "refused", "unreachable",
    "badresponse", "noconfig", ...) and name is None.

    The whole lookup ends within about `timeout` seconds; `timeout <= 0`
    returns (None, "timeout") without a query.  `nameservers` (IP addresses)
    and `port` replace the system resolver configuration (/etc/resolv.conf).
    `clock` returns seconds on a steady clock; the deadline is clock() + timeout, and each
    query may take what is left of it by that clock.
    Raises ValueError when `ip` is not an IP address, `timeout` is NaN or
    infinite, or `nameservers` holds something that is not an address (see
    parse_server); never raises for DNS trouble.
    """
    addr = _start(ip, timeout)
    if addr is None:
        return None, "timeout"
    deadline = clock() + timeout
    resolver, error = _resolver(timeout, nameservers, port)
    if error:
        return None, error
    steps = _steps(addr, confirm=True)
    answer = None
    try:
        while True:
            qname, rdtype = steps.send(answer)
            answer = _query(resolver, qname, rdtype, deadline, clock)
    except StopIteration as done:
        return done.value


async def name_async(ip: str, timeout: float, *, confirm: bool = True, nameservers: list[str] | None = None,
                     port: int = 53) -> tuple[str | None, str | None]:
    """confirmed_name() for an asyncio driver: (name, error), without a thread.

    With confirm=False the name is the first PTR name, unchecked (tcpserver -h without -p).
    Raises ValueError as confirmed_name() does; never raises for DNS trouble.
    """
    addr = _start(ip, timeout)
    if addr is None:
        return None, "timeout"
    import dns.asyncresolver

    deadline = time.monotonic() + timeout
    resolver, error = _resolver(timeout, nameservers, port, dns.asyncresolver.Resolver)
    if error:
        return None, error
    steps = _steps(addr, confirm=confirm)
    answer = None
    try:
        while True:
            qname, rdtype = steps.send(answer)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                answer = None, "timeout"
                continue
            try:
                found = await resolver.resolve(qname, rdtype, lifetime=remaining, raise_on_no_answer=False)
            except Exception as e:  # noqa: BLE001 - _answer re-raises what is not DNS trouble
                answer = _answer(None, e)
            else:
                answer = _answer(found, None)
    except StopIteration as done:
        return done.value


def _start(ip: str, timeout: float) -> IPAddress | None:
    """The client's address to look up, or None when `timeout` leaves no time for a query;
    ValueError for an `ip` that is no address or a NaN or infinite `timeout`."""
    addr = _client_address(ip)
    if math.isnan(timeout) or math.isinf(timeout):
        raise ValueError(f"timeout must be a finite number of seconds: {timeout!r}")
    return addr if timeout > 0 else None


def _steps(addr: IPAddress, *, confirm: bool):
    """The lookup as a generator: yields (qname, rdtype), is sent (rrset or None, error or None),
    returns (name, error) as confirmed_name() describes."""
    import dns.rdatatype
    import dns.reversename

    rrset, error = yield dns.reversename.from_address(str(addr)), dns.rdatatype.PTR
    if rrset is None:
        return None, error
    names = []
    for rr in rrset:
        if rr.target not in names and len(rr.target) > 1:  # skip a PTR to the root "."
            names.append(rr.target)
    if not confirm:
        return (_text(names[0]) if names else None), None
    first_error = None
    for name in names:
        rrset, error = yield name, dns.rdatatype.A if addr.version == 4 else dns.rdatatype.AAAA
        if rrset is not None and any(_same(rr.address, addr) for rr in rrset):
            return _text(name), None
        first_error = first_error or error
    return None, first_error


def parse_server(text: str) -> tuple[list[str], int]:
    """Return ([host], port) from "host", "host:port", "[v6]" or "[v6]:port"; port defaults to 53.

    A bare IPv6 address without brackets ("::1") is taken whole, port 53.
    Raises ValueError when host is not an IP address (a name would need DNS to
    find the DNS server) or port is not 1-65535.
    """
    text = text.strip()
    host, port_text = _split_host_port(text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"DNS server must be an IP address: {text!r}") from None
    port = 53
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"bad DNS server port: {text!r}")
        port = int(port_text)
    return [host], port


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad DNS server: {text!r}")
        return host, rest[1:] if rest else None
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return host, port_text
    return text, None


def _client_address(ip: str) -> IPAddress:
    try:
        addr = ipaddress.ip_address(ip.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"not an IP address: {ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address):
        # tcpserver on a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d;
        # their PTR lives in in-addr.arpa and the name has A records, not AAAA.
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return ipaddress.IPv6Address(int(addr))  # drop any %scope
    return addr


def _resolver(timeout: float, nameservers: list[str] | None, port: int,
              make: Any = None) -> tuple[Any, str | None]:
    import dns.exception
    import dns.resolver

    try:
        resolver = (make or dns.resolver.Resolver)(configure=nameservers is None)
    except (dns.exception.DNSException, OSError) as e:
        # a missing or empty /etc/resolv.conf is the host's DNS trouble, not a bug
        return None, _error_token(e)
    if nameservers is not None:
        resolver.nameservers = list(nameservers)
        resolver.port = port
    resolver.lifetime = timeout
    resolver.cache = None
    return resolver, None


def _same(text: str, addr: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(text) == addr
    except ValueError:
        return False


def _query(resolver: Any, qname: Any, rdtype: Any, deadline: float,
           clock: Callable[[], float]) -> tuple[Any, str | None]:
    """One query within what is left of the deadline: (rrset or None, error token or None)."""
    remaining = deadline - clock()
    if remaining <= 0:
        return None, "timeout"
    try:
        # qname is absolute (a reverse name or a PTR target), so no search list applies.
        return _answer(resolver.resolve(qname, rdtype, lifetime=remaining, raise_on_no_answer=False), None)
    except Exception as e:  # noqa: BLE001 - _answer re-raises what is not DNS trouble
        return _answer(None, e)


def _answer(answer: Any, error: BaseException | None) -> tuple[Any, str | None]:
    """(rrset or None, error token or None) for a query's answer or exception; re-raises a bug."""
    import dns.exception
    import dns.resolver

    if error is None:
        return answer.rrset, None
    if isinstance(error, (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)):
        return None, None
    if isinstance(error, (dns.exception.DNSException, OSError, ValueError)):
        return None, _error_token(error)
    raise error


def _error_token(e: BaseException) -> str:
    import dns.exception
    import dns.resolver

    if isinstance(e, dns.exception.Timeout):
        return "timeout"
    if isinstance(e, dns.resolver.NoResolverConfiguration):
        return "noconfig"
    if isinstance(e, dns.resolver.NoNameservers):
        return _nameserver_error(e.kwargs.get("errors") or [])
    if isinstance(e, dns.resolver.YXDOMAIN):
        return "yxdomain"
    if isinstance(e, OSError):
        return "unreachable"
    return "dnserror"


def _nameserver_error(errors: list[tuple[Any, ...]]) -> str:
    """The last server's complaint: its rcode ("servfail", "refused") or what went wrong on the wire."""
    if not errors:
        return "servfail"
    err = errors[-1][3]
    if isinstance(err, str):
        return err.lower()
    if isinstance(err, OSError):
        return "unreachable"
    return "badresponse"


def _text(name: Any) -> str:
    return name.to_text(omit_final_dot=True).lower()
