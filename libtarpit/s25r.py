"""S25R: is this client's reverse name the kind end-user lines get?

Public names:
  RULES             the published S25R rules 1-6 as compiled regexes (rule number -> pattern)
  RULE_NOTES        one short phrase per rule 0-7, for logs and `tarpitctl s25r`
  EXTRA_RULE        the rule number reported for the optional extra patterns (7)
  Verdict           frozen result: rule matched (or None) and the allow-list entry that overrode it
  match_rule        the first rule (0-6, then 7 if extra=True) a reverse name matches, or None
  AllowList         parsed `s25r-allow` file: name suffixes, exact names, /regex/, IP/CIDR
  classify          allow-list first, then the rules -> Verdict

S25R ("Selective SMTP Rejection", Asami Hideo, gabacho-net.jp/anti-spam/) sorts
clients by the reverse name tcpserver puts in TCPREMOTEHOST.  Rule 0 is "no
reverse name"; rules 1-6 are the author's regular expressions, matched
case-insensitively from the start of the name.  A match does not mean spam: it
means "looks like an end-user line", which our policy tarpits and greylists.

Precedence, written once here and applied in `classify`: the allow-list wins
over every rule; name entries count only when the name is trusted
(forward-confirmed), IP/CIDR entries always.
"""

from __future__ import annotations

import re
from collections import namedtuple
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

from libtarpit.errors import ControlError

if TYPE_CHECKING:
    import ipaddress
    from os import PathLike
    from typing import Iterable

# Start-up is paid on every connection: only the six rules are compiled at
# import; the other patterns are strings that re compiles (and caches) on first
# use, and ipaddress is imported only when an IP entry or lookup needs it.

# The published rules, verbatim apart from the needless escaping of "." inside
# brackets.  Order matters only for which number we report: the first match.
RULES: dict[int, re.Pattern[str]] = {
    1: re.compile(r"^[^.]*[0-9][^0-9.]+[0-9]", re.IGNORECASE),
    2: re.compile(r"^[^.]*[0-9]{5}", re.IGNORECASE),
    3: re.compile(r"^([^.]+\.)?[0-9][^.]*\.[^.]+\..+\.[a-z]", re.IGNORECASE),
    4: re.compile(r"^[^.]*[0-9]\.[^.]*[0-9]-[0-9]", re.IGNORECASE),
    5: re.compile(r"^[^.]*[0-9]\.[^.]*[0-9]\.[^.]+\..+\.", re.IGNORECASE),
    6: re.compile(r"^(dhcp|dialup|ppp|[achrsvx]?dsl)[^.]*[0-9]", re.IGNORECASE),
}

EXTRA_RULE = 7

RULE_NOTES: dict[int, str] = {
    0: "no reverse name",
    1: "first label has digit runs split by non-digits",
    2: "first label has 5 or more digits in a row",
    3: "first or second label starts with a digit",
    4: "first label ends in a digit, second has digit-digit",
    5: "first two labels end in digits, 5 or more labels",
    6: "first label is dhcp/dialup/ppp/xDSL with digits",
    7: "dynamic-looking label (extra pattern)",
}

# Extra patterns (off by default).  S25R keys on digits in the first labels,
# so dynamic pools whose names carry a keyword but few digits slip through,
# e.g. "customer.pool12.isp.example" or "abcdef.dyn.isp.example".  Each token
# below is a word ISPs use for end-user address space:
#   dyn, dynamic, dynip  - "dynamically assigned"; the naming the expired IETF
#                          draft draft-msullivan-dnsop-generic-naming-schemes
#                          proposes, and what SpamAssassin's RDNS_DYNAMIC keys on
#   dial, dialup, dialin - dial-up pools (rule 6 sees only a leading "dialup")
#   dip                  - "dial-in pool", T-Online's dipN.t-ipconnect.de
#   pool, pppool, dpool  - address pools handed out by DHCP/PPPoE
#   cable, cablemodem, catv - cable-TV broadband lines
#   broadband, bband     - retail broadband
#   dhcp, ppp, pppoe, [achrsvx]dsl - the rule-6 words, but anywhere in the
#                          first labels rather than only at the very start
# Only the host part is looked at (never the last two labels), so a provider
# whose own domain is such a word (dyn.com, cable.example) is not hit.
_EXTRA_TOKEN = (
    r"dyn|dynamic|dynip|dial|dialup|dialin|dip|pool|pppool|dpool|cable|cablemodem"
    r"|catv|broadband|bband|dhcp|ppp|pppoe|[achrsvx]?dsl"
)
# Home lines with a name from a dynamic-DNS service: the label left of the
# TLD names the service.  Mail from these goes direct-to-MX from a home line.
_DYNDNS_DOMAIN = r"(^|\.)(dyndns|dyndns-[a-z]+|dynalias|duckdns|no-ip|ddns|dynu)\.[a-z]+$"
_EXTRA_LABELS = 3
_TOKEN_SPLIT = r"[^a-z]+"


class Verdict(namedtuple("Verdict", "rule allowed_by", defaults=(None,))):
    """What S25R and the allow-list say about one client (immutable).

    `rule` is 0-6 for the S25R rule that matched, 7 for an extra pattern, None
    for no match.  `allowed_by` is the allow-list entry that overrode the rules
    (set even when no rule matched: an allow-listed client is trusted).
    """

    __slots__ = ()

    @property
    def suspicious(self) -> bool:
        """True when a rule matched and no allow-list entry overrode it."""
        return self.rule is not None and self.allowed_by is None

    @property
    def reason(self) -> str:
        """A short phrase for a log line: "rule 1", "allow .google.com", "no match"."""
        if self.allowed_by is not None:
            return f"allow {self.allowed_by}"
        if self.rule is None:
            return "no match"
        return f"rule {self.rule}"


def _normalize(name: str | None) -> str:
    """Return the name without a trailing dot, "" for no name or "unknown"."""
    if not name:
        return ""
    name = name.strip().rstrip(".")
    if name.lower() == "unknown":
        return ""
    return name


def _extra_match(name: str) -> bool:
    """True when the host part of `name` carries a dynamic-pool keyword."""
    if re.search(_DYNDNS_DOMAIN, name, re.IGNORECASE):
        return True
    labels = name.split(".")
    host = labels[: min(_EXTRA_LABELS, len(labels) - 2)]
    for label in host:
        for token in re.split(_TOKEN_SPLIT, label, flags=re.IGNORECASE):
            if token and re.fullmatch(_EXTRA_TOKEN, token, re.IGNORECASE):
                return True
    return False


def match_rule(name: str | None, *, extra: bool = False) -> int | None:
    """Return the first S25R rule `name` matches (0-6; 7 for extra patterns), or None.

    `name` is TCPREMOTEHOST as tcpserver gives it: None, "" and "unknown" mean
    no reverse name (rule 0); a trailing dot is ignored; case does not matter.
    Never raises.
    """
    host = _normalize(name)
    if not host:
        return 0
    for number, pattern in RULES.items():
        if pattern.search(host):
            return number
    if extra and _extra_match(host):
        return EXTRA_RULE
    return None


_NAME = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*"
# Anything made of digits and dots, or holding ":" or an inner "/", is read as
# an address, so a tcprules-style prefix ("192.0.2.") fails loudly instead of
# becoming an exact name that never matches.
_LOOKS_NUMERIC = r"[0-9.]+(/[0-9]*)?|.*:.*|[^/].*/.*"


def _parse_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Return the network an IP or CIDR entry names; raise ValueError if it is bad."""
    import ipaddress

    return ipaddress.ip_network(entry, strict=False)


def _parse_regex(entry: str) -> re.Pattern[str]:
    """Return the compiled /regex/ entry; raise ValueError if it is bad."""
    if len(entry) < 3 or not entry.endswith("/"):
        raise ValueError("a regex entry is /pattern/ with a non-empty pattern")
    try:
        return re.compile(entry[1:-1], re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"bad regex: {e}") from None


def _split_line(raw: str) -> str:
    """Return the entry on one line ("" for blank/comment); raise ValueError on junk."""
    words = raw.split()
    if not words or words[0].startswith("#"):
        return ""
    if len(words) > 1 and not words[1].startswith("#"):
        raise ValueError("one entry a line; a comment after it starts with #")
    return words[0]


class AllowList:
    """The `s25r-allow` control file, parsed once.

    Entry kinds (one a line, `#` comments, blank lines ignored):
      .example.com     name suffix: any name ending in ".example.com"
                       ("*.example.com" is accepted as the same thing)
      mx.example.com   exact name
      /regex/          Python regex, case-insensitive, searched in the name
      192.0.2.0/24     IPv4 or IPv6 address or CIDR network
    Name entries apply only to trusted (forward-confirmed) names; IP entries
    always.  Lookup order: IP, exact, suffix (longest first), regex.
    """

    def __init__(self) -> None:
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        self._exact: dict[str, str] = {}
        self._suffixes: dict[str, str] = {}
        self._regexes: list[tuple[re.Pattern[str], str]] = []

    def __len__(self) -> int:
        return len(self._networks) + len(self._exact) + len(self._suffixes) + len(self._regexes)

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> AllowList:
        """Return the AllowList in `text`.

        Raises ControlError(source, reason, line) on the first line that is
        not a valid entry (bad regex, bad address or CIDR, stray text).
        """
        allow = cls()
        for number, raw in enumerate(text.splitlines(), start=1):
            try:
                entry = _split_line(raw)
                if entry:
                    allow._add(entry)
            except ValueError as e:
                raise ControlError(source, str(e), number) from None
        return allow

    @classmethod
    def load(cls, path: str | PathLike[str]) -> AllowList:
        """Return the AllowList in the file at `path`; an empty one if it does not exist.

        Raises ControlError when the file exists but cannot be read (permission,
        a directory, not UTF-8) or one of its lines cannot be parsed.
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ControlError(str(path), f"cannot read: {reason}") from None
        return cls.parse(text, str(path))

    def _add(self, entry: str) -> None:
        """Store one entry; raise ValueError if it is not one of the four kinds."""
        if entry.startswith("/"):
            self._regexes.append((_parse_regex(entry), entry))
        elif re.fullmatch(_LOOKS_NUMERIC, entry):
            try:
                self._networks.append((_parse_network(entry), entry))
            except ValueError:
                raise ValueError(f"not an IP address or CIDR network: {entry}") from None
        else:
            self._add_name(entry)

    def _add_name(self, entry: str) -> None:
        """Store a suffix or exact-name entry; raise ValueError if it is not a name."""
        body = entry[2:] if entry.startswith("*.") else entry
        suffix = entry.startswith("*.") or body.startswith(".")
        body = body[1:] if body.startswith(".") else body
        body = body[:-1] if body.endswith(".") else body
        if not re.fullmatch(_NAME, body, re.IGNORECASE):
            raise ValueError(f"not a host name, .suffix, /regex/ or address: {entry}")
        table = self._suffixes if suffix else self._exact
        table.setdefault(body.lower(), entry)

    def match(self, name: str | None, ip: str | None, *, name_trusted: bool = True) -> str | None:
        """Return the text of the entry that lets this client through, or None.

        `ip` that does not parse is ignored (no IP entry can match it); name
        entries are skipped when `name_trusted` is False.  Never raises.
        """
        hit = self._match_ip(ip)
        if hit is None and name_trusted:
            hit = self._match_name(_normalize(name).lower())
        return hit

    def _match_ip(self, ip: str | None) -> str | None:
        """Return the first IP/CIDR entry containing `ip`, or None."""
        if not ip or not self._networks:
            return None
        for address in _addresses(ip):
            for network, entry in self._networks:
                if address.version == network.version and address in network:
                    return entry
        return None

    def _match_name(self, host: str) -> str | None:
        """Return the exact, suffix or regex entry matching `host`, or None."""
        if not host:
            return None
        if host in self._exact:
            return self._exact[host]
        labels = host.split(".")
        for i in range(1, len(labels)):
            entry = self._suffixes.get(".".join(labels[i:]))
            if entry is not None:
                return entry
        for pattern, entry in self._regexes:
            if pattern.search(host):
                return entry
        return None


def _addresses(ip: str) -> Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Yield the address `ip` names, plus its IPv4 form if it is IPv4-mapped IPv6."""
    import ipaddress

    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return (address, address.ipv4_mapped)
    return (address,)


def classify(
    name: str | None,
    ip: str | None,
    allow: AllowList | None = None,
    *,
    extra: bool = False,
    name_trusted: bool = True,
) -> Verdict:
    """Return the Verdict for a client: allow-list first, then the S25R rules.

    The rule is always reported (for logs) even when the allow-list overrides
    it.  Never raises, whatever text `name` and `ip` hold.
    """
    rule = match_rule(name, extra=extra)
    allowed_by = allow.match(name, ip, name_trusted=name_trusted) if allow is not None else None
    return Verdict(rule=rule, allowed_by=allowed_by)
