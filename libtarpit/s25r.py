"""S25R: is this client's reverse name the kind end-user lines get?

Public names:
  RULES             the published S25R rules 1-6 as compiled regexes (rule number -> pattern),
                    built on first access
  RULE_SOURCES      the same rules as pattern text (rule number -> str)
  RULE_NOTES        one short phrase per rule 0-7, for logs and `tarpitctl s25r`
  EXTRA_RULE        the rule number reported for the optional extra patterns (7)
  DYNAMIC_WORDS     the dynamic-pool words of rule 7
  HINT_WORDS        the mail-server words that outrank rules 1-5 (never a dynamic word)
  Verdict           frozen result: rule matched (or None), the allow-list entry and the
                    hint that overrode it
  match_rule        the first rule (0-6, then 7 if extra=True) a reverse name matches, or None
  server_hint       the mail-server word that outranks rules 1-5 for a name, or None
  AllowList         parsed `s25r-allow` file: name suffixes, exact names, /regex/, IP/CIDR
  classify          allow-list first, then the rules and hints -> Verdict
  explain           the same decision as classify, in sentences (`tarpitctl s25r --explain`)

S25R ("Selective SMTP Rejection", Asami Hideo, gabacho-net.jp/anti-spam/) sorts
clients by the reverse name tcpserver puts in TCPREMOTEHOST.  Rule 0 is "no
reverse name"; rules 1-6 are the author's regular expressions, matched
case-insensitively from the start of the name.  A match does not mean spam: it
means "looks like an end-user line", which our policy tarpits and greylists.

Precedence, written once here and applied in `classify`: the allow-list wins
over every rule; name entries count only when the name is trusted
(forward-confirmed), IP/CIDR entries always.  Then a mail-server hint (a host
label word such as "smtp" or "mx") outranks rules 1-5, unless a dynamic-pool
word sits in the same labels; it never outranks rules 0, 6 or 7.  Why these
words and defaults: docs/s25r.md, "Measured defaults".
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

# Start-up is paid on every connection: nothing is compiled at import.  The six
# rules are compiled on first use as one alternation (one compile, one match
# call: anchored alternatives are tried in rule order, so the first that
# matches is the first rule); rule 7 and the hints are set look-ups on the
# words of the host labels, no regex at all; ipaddress is imported only when an
# IP entry or lookup needs it.

# The published rules, verbatim apart from the needless escaping of "." inside
# brackets.  Order matters only for which number we report: the first match.
RULE_SOURCES: dict[int, str] = {
    1: r"^[^.]*[0-9][^0-9.]+[0-9]",
    2: r"^[^.]*[0-9]{5}",
    3: r"^([^.]+\.)?[0-9][^.]*\.[^.]+\..+\.[a-z]",
    4: r"^[^.]*[0-9]\.[^.]*[0-9]-[0-9]",
    5: r"^[^.]*[0-9]\.[^.]*[0-9]\.[^.]+\..+\.",
    6: r"^(dhcp|dialup|ppp|[achrsvx]?dsl)[^.]*[0-9]",
}
# Inner groups made non-capturing so that `lastgroup` names the rule.
_RULES_ALTERNATION = "^(?:" + "|".join(
    f"(?P<r{n}>{src[1:].replace('(', '(?:')})" for n, src in RULE_SOURCES.items()) + ")"
_rules_re: re.Pattern[str] | None = None
_RULE_OF_GROUP = {f"r{n}": n for n in RULE_SOURCES}


def _rules() -> re.Pattern[str]:
    """Return the six rules as one compiled alternation (compiled once per process)."""
    global _rules_re
    if _rules_re is None:
        _rules_re = re.compile(_RULES_ALTERNATION, re.IGNORECASE)
    return _rules_re


def __getattr__(name: str) -> object:
    """Build RULES on first access: nothing on the connection path reads it."""
    if name == "RULES":
        rules = {n: re.compile(src, re.IGNORECASE) for n, src in RULE_SOURCES.items()}
        globals()["RULES"] = rules
        return rules
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

# Extra patterns (rule 7).  S25R keys on digits in the first labels, so
# dynamic pools whose names carry a keyword but few digits slip through, e.g.
# "customer.pool12.isp.example" or "abcdef.dyn.isp.example".  Each word below
# is one ISPs use for end-user address space:
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
# A word is a whole run of letters in one of the first three labels, never the
# last two, so a provider whose own domain is such a word (dyn.com,
# cable.example) is not hit, nor is "dipole" or "dynamics".
DYNAMIC_WORDS = frozenset(
    "dyn dynamic dynip dial dialup dialin dip pool pppool dpool cable cablemodem catv"
    " broadband bband dhcp ppp pppoe dsl adsl cdsl hdsl rdsl sdsl vdsl xdsl".split())
# Home lines with a name from a dynamic-DNS service: the label left of the
# TLD names the service ("dyndns-" followed by letters counts too).  Mail from
# these goes direct-to-MX from a home line.
_DYNDNS_SERVICES = frozenset("dyndns dynalias duckdns no-ip ddns dynu".split())
_HOST_LABELS = 3

# Mail-server hints: a word that names the host's job as a mail server, or the
# line as a static one.  S25R flags real outbound MTAs whose first label
# carries a pool number (smtp-out2-04.simnet.is, mail-01-1.mymagenta.at,
# static-71-117-165-76.prvdri.fios.verizon.net); an end-user line's name does
# not say "smtp".  A hint outranks rules 1-5 only, and never a dynamic word in
# the same labels ("mail1-2.dsl.isp.example" stays suspicious).  Only words
# that turned a measured false positive into a right answer on the corpus,
# without letting a dynamic name through, are here; "mx", "out", "relay" and
# "dedicated" gained nothing once the allow-list had the large senders
# (docs/s25r.md, "Measured defaults").
HINT_WORDS = frozenset("mail smtp static".split())

# str.translate table: ASCII letters to lower case, every other ASCII
# character to a space; non-ASCII characters stay (they are never a word here).
_WORD_TABLE = "".join(
    c.lower() if c.isalpha() else " " for c in map(chr, range(128)))


def _host_words(name: str) -> list[list[str]]:
    """Return the words of the first three labels, never the last two, per label."""
    labels = name.lower().split(".")
    host = labels[: min(_HOST_LABELS, len(labels) - 2)]
    return [label.translate(_WORD_TABLE).split() for label in host]


def _words(low: str) -> list[str]:
    """Return the words of the first three labels of lower-case `low`, never the last two."""
    n = low.count(".") - 1  # labels that are not the last two
    if n <= 0:
        return []
    end = -1
    for _ in range(n if n < _HOST_LABELS else _HOST_LABELS):
        end = low.find(".", end + 1)
    return low[:end].translate(_WORD_TABLE).split()


def _dyndns_service(low: str) -> str | None:
    """Return "service.tld" when lower-case `low` sits under a dynamic-DNS service, else None."""
    dot = low.rfind(".")
    service = low[low.rfind(".", 0, dot) + 1:dot] if dot > 0 else ""
    if service not in _DYNDNS_SERVICES and not service.startswith("dyndns-"):
        return None
    tld = low[dot + 1:]
    if not (tld.isascii() and tld.isalpha()):
        return None
    if service[:7] == "dyndns-" and not (service[7:].isascii() and service[7:].isalpha()):
        return None
    return f"{service}.{tld}"


class Verdict(namedtuple("Verdict", "rule allowed_by hint", defaults=(None, None))):
    """What S25R, the allow-list and the hints say about one client (immutable).

    `rule` is 0-6 for the S25R rule that matched, 7 for an extra pattern, None
    for no match.  `allowed_by` is the allow-list entry that overrode the rules
    (set even when no rule matched: an allow-listed client is trusted).  `hint`
    is the mail-server word that outranked rule 1-5 (the client is then normal,
    not trusted); the rule is still reported, for logs.
    """

    __slots__ = ()

    @property
    def suspicious(self) -> bool:
        """True when a rule matched and neither an allow-list entry nor a hint overrode it."""
        return self.rule is not None and self.allowed_by is None and self.hint is None

    @property
    def reason(self) -> str:
        """A short phrase for a log line: "rule 1", "allow .google.com", "hint smtp", "no match"."""
        if self.allowed_by is not None:
            return f"allow {self.allowed_by}"
        if self.hint is not None:
            return f"hint {self.hint}"
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


def _extra_match(low: str) -> bool:
    """True when lower-case `low` has a dynamic-pool word in its host part or a dynamic-DNS domain."""
    return not DYNAMIC_WORDS.isdisjoint(_words(low)) or _dyndns_service(low) is not None


def _rule_of(host: str, extra: bool) -> int | None:
    """Return the rule for normalized, non-empty `host` (see match_rule)."""
    m = (_rules_re or _rules()).match(host)
    if m is not None:
        return _RULE_OF_GROUP[m.lastgroup]  # type: ignore[index]
    if extra and _extra_match(host.lower()):
        return EXTRA_RULE
    return None


def match_rule(name: str | None, *, extra: bool = False) -> int | None:
    """Return the first S25R rule `name` matches (0-6; 7 for extra patterns), or None.

    `name` is TCPREMOTEHOST as tcpserver gives it: None, "" and "unknown" mean
    no reverse name (rule 0); a trailing dot is ignored; case does not matter.
    Never raises.
    """
    host = _normalize(name)
    return _rule_of(host, extra) if host else 0


def server_hint(name: str | None) -> str | None:
    """Return the mail-server word (HINT_WORDS) that outranks rules 1-5 for `name`, or None.

    None also when a dynamic-pool word sits in the same labels: a hint never
    outranks a dynamic word.  Looks at the first three labels, never the last
    two.  Never raises.
    """
    return _hint_of(_normalize(name).lower())


def _hint_of(low: str) -> str | None:
    """Return server_hint for normalized lower-case `low`."""
    for word in HINT_WORDS:
        if word in low:
            break
    else:
        return None  # most names hold none of the words anywhere: skip splitting them
    words = _words(low)
    if not words or not DYNAMIC_WORDS.isdisjoint(words):
        return None
    for word in words:
        if word in HINT_WORDS:
            return word
    return None


# A name entry: dot-separated labels of letters, digits, "_" and "-", none
# empty, none starting or ending with "-".  An entry made of digits and dots
# (maybe with "/N"), or holding ":" or an inner "/", is read as an address, so
# a tcprules-style prefix ("192.0.2.") fails loudly instead of becoming an
# exact name that never matches.  Plain string tests, not regexes: the list is
# parsed on every connection and a regex costs its compile there.
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_ADDRESS_CHARS = frozenset("0123456789.")


def _is_name(body: str) -> bool:
    """True when `body` is a host name as a name entry may hold one."""
    for label in body.split("."):
        if not label or label[0] == "-" or label[-1] == "-" or not _LABEL_CHARS.issuperset(label):
            return False
    return True


def _looks_numeric(entry: str) -> bool:
    """True when `entry` (not a /regex/) must be an address or network."""
    if ":" in entry or "/" in entry[1:]:
        return True
    return _ADDRESS_CHARS.issuperset(entry)


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

    def __init__(self, source: str = "<text>") -> None:
        self.source = source
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        self._exact: dict[str, str] = {}
        self._suffixes: dict[str, str] = {}
        self._regexes: list[tuple[re.Pattern[str], str]] = []
        self._lines: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._networks) + len(self._exact) + len(self._suffixes) + len(self._regexes)

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> AllowList:
        """Return the AllowList in `text`.

        Raises ControlError(source, reason, line) on the first line that is
        not a valid entry (bad regex, bad address or CIDR, stray text).
        """
        allow = cls(source)
        for number, raw in enumerate(text.splitlines(), start=1):
            try:
                entry = _split_line(raw)
                if entry:
                    allow._add(entry)
                    allow._lines.setdefault(entry, number)
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
            return cls(str(path))
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ControlError(str(path), f"cannot read: {reason}") from None
        return cls.parse(text, str(path))

    def line_of(self, entry: str) -> int | None:
        """Return the line number `entry` (as `match` returns it) was read from, or None."""
        return self._lines.get(entry)

    def _add(self, entry: str) -> None:
        """Store one entry; raise ValueError if it is not one of the four kinds."""
        if entry.startswith("/"):
            self._regexes.append((_parse_regex(entry), entry))
        elif _looks_numeric(entry):
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
        if not _is_name(body):
            raise ValueError(f"not a host name, .suffix, /regex/ or address: {entry}")
        table = self._suffixes if suffix else self._exact
        table.setdefault(body.lower(), entry)

    def match(self, name: str | None, ip: str | None, *, name_trusted: bool = True) -> str | None:
        """Return the text of the entry that lets this client through, or None.

        `ip` that does not parse is ignored (no IP entry can match it); name
        entries are skipped when `name_trusted` is False.  Never raises.
        """
        return self._lookup(_normalize(name).lower(), ip, name_trusted)

    def _lookup(self, low: str, ip: str | None, name_trusted: bool) -> str | None:
        """match() for a name already normalized and in lower case."""
        hit = self._match_ip(ip) if ip else None
        if hit is None and name_trusted and low:
            hit = self._match_name(low)
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
        entry = self._exact.get(host)
        if entry is not None:
            return entry
        if self._suffixes:
            # every suffix after a dot, longest first
            dot = host.find(".")
            while dot >= 0:
                entry = self._suffixes.get(host[dot + 1:])
                if entry is not None:
                    return entry
                dot = host.find(".", dot + 1)
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
    hints: bool = True,
) -> Verdict:
    """Return the Verdict for a client: allow-list first, then the S25R rules and hints.

    The rule is always reported (for logs) even when the allow-list or a hint
    overrides it.  A hint (HINT_WORDS) is looked for only when rule 1-5
    matched and no allow-list entry did; `hints=False` leaves them out (what
    bare S25R says).  Never raises, whatever text `name` and `ip` hold.
    """
    # match_rule, AllowList.match and server_hint written out once: this runs
    # for every connection, and each would normalize the name again
    host = name.strip().rstrip(".") if name else ""
    low = host.lower()
    if not host or low == "unknown":
        host = low = ""
        rule: int | None = 0
    else:
        m = (_rules_re or _rules()).match(host)
        if m is not None:
            rule = _RULE_OF_GROUP[m.lastgroup]  # type: ignore[index]
        elif extra and (not DYNAMIC_WORDS.isdisjoint(_words(low)) or _dyndns_service(low) is not None):
            rule = EXTRA_RULE
        else:
            rule = None
    allowed_by = allow._lookup(low, ip, name_trusted) if allow is not None else None
    hint = None
    if hints and allowed_by is None and rule is not None and 1 <= rule <= 5:
        hint = _hint_of(low)
    return tuple.__new__(Verdict, (rule, allowed_by, hint))  # Verdict(...) without its Python __new__


def explain(
    name: str | None,
    ip: str | None,
    allow: AllowList | None = None,
    *,
    extra: bool = False,
    name_trusted: bool = True,
    hints: bool = True,
) -> tuple[Verdict, list[str]]:
    """Return classify's Verdict and sentences saying what decided it and why.

    The first sentence names what decided (the allow-list entry with its file
    and line, the hint, the rule, or that nothing matched); the rest say which
    rule matched and on what part of the name, or why no rule did.  Never raises.
    """
    verdict = classify(name, ip, allow, extra=extra, name_trusted=name_trusted, hints=hints)
    host = _normalize(name)
    lines: list[str] = []
    if verdict.allowed_by is not None and allow is not None:
        entry = verdict.allowed_by
        line = allow.line_of(entry)
        where = f"{allow.source}:{line}" if line else allow.source
        kind = ("an address or network entry" if allow._match_ip(ip) == entry
                else "a name entry, which counts only for a forward-confirmed name")
        lines.append(f"decided by: allow-list entry {entry} ({where}), {kind}; "
                     "the allow-list wins over every rule")
    elif verdict.hint is not None:
        label = next((lb for lb in host.split(".") if verdict.hint in lb.lower().translate(_WORD_TABLE).split()), "")
        lines.append(f"decided by: mail-server hint \"{verdict.hint}\" in label \"{label}\"; "
                     f"a hint outranks rules 1-5 when no dynamic-pool word is in the first labels")
    elif verdict.rule is not None:
        lines.append(f"decided by: rule {verdict.rule} ({RULE_NOTES[verdict.rule]}): suspicious")
        if hints and 1 <= verdict.rule <= 5:
            lines.extend(_unused_hint(host))
    else:
        lines.append("decided by: no rule matched: not suspicious")
    lines.extend(_rule_sentences(host, verdict.rule, extra))
    return verdict, lines


def _unused_hint(host: str) -> list[str]:
    """Return why a hint word in `host` did not outrank the rule (a dynamic word), or []."""
    words = [w for ws in _host_words(host) for w in ws]
    hint = next((w for w in words if w in HINT_WORDS), None)
    dynamic = next((w for w in words if w in DYNAMIC_WORDS), None)
    if hint is None or dynamic is None:
        return []
    return [f"hint \"{hint}\" not used: the dynamic-pool word \"{dynamic}\" is in the same labels"]


def _rule_sentences(host: str, rule: int | None, extra: bool) -> list[str]:
    """Return what the rules saw in `host` (normalized): the pattern and matched part."""
    if not host:
        return ["rule 0: no reverse name (TCPREMOTEHOST unset, empty or \"unknown\")"]
    if rule is not None and rule <= 6:
        m = _rules().match(host)
        part = m.group(m.lastgroup) if m is not None and m.lastgroup else ""
        return [f"rule {rule}: pattern {RULE_SOURCES[rule]} matched \"{part}\""]
    if rule == EXTRA_RULE:
        for label, words in zip(host.split("."), _host_words(host)):
            hit = sorted(DYNAMIC_WORDS.intersection(words))
            if hit:
                return [f"rule 7: dynamic-pool word \"{hit[0]}\" in label \"{label}\""]
        service = _dyndns_service(host)
        return [f"rule 7: the name is under the dynamic-DNS service {service}"]
    off = "" if extra else "; rule 7 (dynamic-pool words) is off"
    return [f"rules 1-6: no pattern matches{off}"]
