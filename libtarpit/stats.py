"""Logs -> seed 000's give-up table, seed 001's funnel, top reasons, warn counts.

Pure: every function works on strings, parsed event dicts and numbers; the
caller reads the files and owns the clock (`now` is always a parameter).

Public names:
  parse_tai64n    multilog's "@4000…" TAI64N label -> Unix seconds
  line_time       time at the start of a log line (TAI64N, ISO-8601, syslog) or None
  parse_since     --since text ("2026-11-01", "2026-11-01 12:00", "7d", "12h") -> Unix seconds
  parse_events    lines -> our events as dicts (other lines dropped)
  bucket_of       seconds -> the bucket it rounds to (seed 000: nearest 10 s)
  giveup_table    events -> GiveupTable: LC / PL / % per bucket, total, cumulative rows
  funnel          events -> Funnel: connections -> suspicious -> lost -> greylisted -> passed
  top_reasons     events -> most frequent refusal reasons (ReasonCount)
  warn_counts     events -> what warn mode would have done (WarnCount)
  tls_share       events -> TlsShare: connections that ended, how many of them encrypted
  network_of      an ip= value -> its client network ("192.0.2.0/24", "2001:db8::/64") or "-"
  auth_summary    events -> AuthSummary: ok / fail per mechanism, failures per client network
  error_summary   events -> ErrorSummary: error lines by what=, greylist store errors
  delivered_suspicious  events -> NameCount: suspicious clients that passed and delivered
                  (the s25r-allow upkeep list, most connections first)
  totals          events -> Totals: every count uncut, per label (for --prometheus)
  build_report    events -> Report (all of the above)
  report_to_dict  Report -> a JSON-ready dict
  format_report   Report -> the text `tarpitctl stats` prints
  metrics         Report -> the Prometheus metrics (Metric), names tarpit_smtpd_*
  format_prometheus  metrics -> text in the Prometheus exposition format
  GiveupRow, CumulativeRow, GiveupTable, Funnel, ReasonCount, WarnCount, TlsShare,
  AuthCount, AuthSummary, ErrorSummary, NameCount, Totals, Metric, Report

Counting rules (seed 000): a tarpitted connection counts at most once; one
that pipelined counts as PL at its first `pipelining` elapsed, otherwise its
first `tarpit_lost` counts as LC.  A tarpit_lost with mode=warn never counts; a pipelining
line counts whatever its mode (its default action is warn: it is logged during a real tarpit)
or in the funnel; they are counted by warn_counts instead.

Bounds (a log line may be forged or damaged, and must not cost us time):
an elapsed outside 0..MAX_SECONDS, or not a finite number, is left out of
the table and counted as `skipped`; the table has a row per bucket present,
plus zero rows for runs of at most GAP_ROWS empty buckets, so its length is
linear in the lines read whatever the values.  Text from the log is passed
through libtarpit.text.printable before it is printed.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator, Mapping

from libtarpit.log import parse_line, prefix
from libtarpit.text import printable

Event = Mapping[str, str]
ConnKey = tuple[str, ...]

# libtai's tai_now() stores 2^62 + 10 + unix time (the 10 s TAI-UTC offset of 1970).
_TAI_OFFSET = (1 << 62) + 10
_TAI64N = re.compile(r"@?([0-9a-fA-F]{16})([0-9a-fA-F]{8})")
MAX_SECONDS = 86400.0  # an elapsed beyond a day is no tarpit or pause of ours
GAP_ROWS = 5           # up to this many empty buckets in a row print as zero rows
_FIELD = 40            # characters of an event or reason printed in the text report
_DETAIL = 100          # characters of an error's detail printed in the text report
_HOST = 100            # characters of a client's name printed in the upkeep list
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_MONTHS = {m: i for i, m in enumerate(
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), start=1)}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_REASON_FIELD = {
    "helo_reject": "reason",
    "rcpt_reject": "reason",
    "greylist_defer": "reason",
    "pregreet": None,
    "error": "what",
}
_REJECTS = frozenset({"helo_reject", "rcpt_reject", "greylist_defer", "pregreet"})
_PASSES = frozenset({"tarpit_done", "greylist_pass"})
_REFUSALS = frozenset({"helo_reject", "rcpt_reject", "pregreet"})
# AUTH mechanisms a Prometheus label may name; the client names the mechanism, so any
# other word is counted as "other" (a bot must not create series at will)
AUTH_MECHANISMS = frozenset(
    "PLAIN LOGIN CRAM-MD5 DIGEST-MD5 NTLM GSSAPI XOAUTH2 OAUTHBEARER EXTERNAL ANONYMOUS "
    "SCRAM-SHA-1 SCRAM-SHA-1-PLUS SCRAM-SHA-256 SCRAM-SHA-256-PLUS".split())
UPKEEP_TOP = 20        # names in the s25r-allow upkeep list
# end reasons of a session that ran its course: after QUIT and 221 both sides close, and
# the log says whichever the wrapper saw first
ENDED_NORMALLY = frozenset({"backend_closed", "client_closed"})
_WOULD = {
    "tarpit_start": "would tarpit",
    "helo_reject": "would refuse HELO",
    "rcpt_reject": "would refuse RCPT",
    "greylist_defer": "would greylist",
    "pregreet": "would refuse pregreet",
    "pipelining": "would refuse pipelining",
}


@dataclass(frozen=True)
class GiveupRow:
    """One row of seed 000's table: bucket start (s), LC, PL, (LC+PL) % of total."""

    bucket: int
    lc: int
    pl: int
    percent: int


@dataclass(frozen=True)
class CumulativeRow:
    """Connections that gave up (LC+PL) before `mark` seconds, and % of total."""

    mark: int
    count: int
    percent: int


@dataclass(frozen=True)
class GiveupTable:
    """Seed 000's table: rows per bucket, total LC+PL, cumulative rows.

    `skipped`: give-up lines left out because their elapsed was not a number
    in 0..MAX_SECONDS.
    """

    bucket_size: int
    rows: tuple[GiveupRow, ...]
    total: int
    cumulative: tuple[CumulativeRow, ...]
    skipped: int = 0


@dataclass(frozen=True)
class Funnel:
    """Seed 001's funnel, in distinct connections."""

    connections: int
    suspicious: int
    lost_in_tarpit: int
    greylisted: int
    passed: int


@dataclass(frozen=True)
class ReasonCount:
    """How many enforced lines of `event` carried `reason`."""

    event: str
    reason: str
    count: int


@dataclass(frozen=True)
class WarnCount:
    """How many mode=warn lines said the policy would have done `label`."""

    label: str
    event: str
    count: int


@dataclass(frozen=True)
class TlsShare:
    """Distinct connections with an `end` line, and how many of them ended encrypted.

    `encrypted`: their end line carries tls=1; of those, `terminated` had a
    `tls` line (the wrapper ran the handshake) and `passthrough` a
    `tls_passthrough` line.  `failed`: connections with a `tls_failed` line.
    `fast_path`: connections that went to `exec` (no end line; their TLS, if
    any, is the backend's and not in the log).
    """

    ended: int
    encrypted: int
    percent: int
    terminated: int
    passthrough: int
    failed: int
    fast_path: int


@dataclass(frozen=True)
class AuthCount:
    """`auth` lines for one key (a mechanism or a client network): ok and failed."""

    key: str
    ok: int
    fail: int


@dataclass(frozen=True)
class AuthSummary:
    """`auth` lines: totals, per mechanism, and the client networks with the most failures.

    `mechanisms` holds at most `top` mechanisms, most failures first.
    `networks` holds at most `top` networks with at least one failure, most
    failures first (ok counts beside); `networks_failing` how many there were in all.
    """

    ok: int
    fail: int
    mechanisms: tuple[AuthCount, ...]
    networks: tuple[AuthCount, ...]
    networks_failing: int


@dataclass(frozen=True)
class ErrorSummary:
    """`error` lines: total, count per what= (most frequent first, at most `top`),
    and the greylist store's: lines, distinct connections, most frequent details."""

    total: int
    by_what: tuple[ReasonCount, ...]
    greylist: int
    greylist_connections: int
    greylist_details: tuple[ReasonCount, ...]


@dataclass(frozen=True)
class NameCount:
    """A suspicious client that delivered: its `name` (its address when it had none),
    how many connections of it delivered (`count`), and the S25R `rule` it matched."""

    name: str
    count: int
    rule: str


Pairs = tuple[tuple[tuple[str, ...], int], ...]  # ((label values), count), sorted by labels


@dataclass(frozen=True)
class Totals:
    """Every count uncut, keyed by the values that become Prometheus labels.

    connections  (class,): distinct connections; "none" when no line named a class
    greet_lost   connections that hung up in the greet pause
    sat_through  enforced tarpit_done lines (a tarpit sat through)
    deferrals    (reason,): enforced greylist_defer lines (each a 450)
    passes       (reason,): greylist_pass lines
    refusals     (event, reason): enforced helo_reject, rcpt_reject, pregreet lines
    warn         (event,): mode=warn lines
    ends         (reason,): end lines
    errors       (what,): error lines
    auth         (mechanism, ok|fail): auth lines; mechanisms outside AUTH_MECHANISMS as "other"
    """

    connections: Pairs
    greet_lost: int
    sat_through: int
    deferrals: Pairs
    passes: Pairs
    refusals: Pairs
    warn: Pairs
    ends: Pairs
    errors: Pairs
    auth: Pairs


@dataclass(frozen=True)
class Metric:
    """One Prometheus metric family: name, help text, type, label names, samples.

    `samples` are ((label values), value) in a fixed order; a family without
    labels has one sample with ().
    """

    name: str
    help: str
    type: str
    labels: tuple[str, ...]
    samples: tuple[tuple[tuple[str, ...], float], ...]


@dataclass(frozen=True)
class Report:
    """Everything `tarpitctl stats` shows, computed from one list of events."""

    events: int
    giveup: GiveupTable
    funnel: Funnel
    reasons: tuple[ReasonCount, ...]
    warn: tuple[WarnCount, ...]
    tls: TlsShare
    auth: AuthSummary
    errors: ErrorSummary
    delivered: tuple[NameCount, ...] = ()
    totals: Totals | None = None


def parse_tai64n(stamp: str) -> float:
    """Return the Unix time of a TAI64N label ("@4000…", 24 hex digits, '@' optional).

    Raises ValueError if `stamp` is not a TAI64N label.
    """
    m = _TAI64N.fullmatch(stamp.strip())
    if m is None:
        raise ValueError(f"not a TAI64N label: {stamp[:40]!r}")
    nanos = int(m.group(2), 16)
    if nanos >= 1_000_000_000:
        raise ValueError(f"TAI64N nanoseconds out of range: {stamp[:40]!r}")
    return int(m.group(1), 16) - _TAI_OFFSET + nanos / 1e9


def line_time(line: str, now: float | None = None) -> float | None:
    """Return the Unix time a log line starts with, or None if it carries none.

    The stamps are the ones libtarpit.log.PREFIX recognises (the same that
    make a line ours), each followed by a space: multilog's "@4000…" TAI64N
    stamp (wins when s6-log puts an ISO stamp after it), an ISO-8601 stamp
    (journalctl -o short-iso, rsyslog, s6-log T) and a syslog "Nov  1 12:00:00"
    stamp; the latter has no year, so it is dated only when `now` is given (the
    most recent such date not more than a day after `now`).  Times without a
    zone are local time.  Never raises.
    """
    m = prefix(line)
    if m["tai"]:
        try:
            return parse_tai64n(m["tai"])
        except ValueError:
            return None
    if m["date"]:
        return _iso_time(m)
    if m["month"] and now is not None:
        return _syslog_time(m, now)
    return None


def _iso_time(m: re.Match[str]) -> float | None:
    text = f"{m['date']}T{m['time'].replace(',', '.')}{m['zone'] or ''}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _syslog_time(m: re.Match[str], now: float) -> float | None:
    month = _MONTHS.get(m["month"])
    if month is None:
        return None
    hour, minute, second = (int(x) for x in m["hms"].split(":"))
    year = datetime.fromtimestamp(now).year
    for y in (year, year - 1):
        try:
            t = datetime(y, month, int(m["day"]), hour, minute, second).timestamp()
        except ValueError:
            continue
        if t <= now + 86400:
            return t
    return None


def parse_since(text: str, now: float) -> float:
    """Return the Unix time meant by a --since value, relative to `now`.

    Accepts a date ("2026-11-01", local midnight), a date and time
    ("2026-11-01 12:00", "2026-11-01T12:00:00+01:00") or an age
    ("90s", "30m", "12h", "7d", "2w").  Raises ValueError otherwise.
    """
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m is not None:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"bad --since {text!r}: use 2026-11-01, '2026-11-01 12:00', 7d or 12h"
        ) from None


def parse_events(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """Yield our lines as parsed dicts (libtarpit.log.parse_line); skip all others."""
    for line in lines:
        event = parse_line(line)
        if event is not None:
            yield event


def bucket_of(seconds: float, size: int = 10) -> int:
    """Return the bucket `seconds` rounds to: nearest multiple of `size`, half up, >= 0.

    With size 10, bucket 0 holds s < 5 and bucket 10 holds 5 <= s < 15 (seed 000).
    """
    return max(0, math.floor(seconds / size + 0.5)) * size


def _percent(part: int, total: int) -> int:
    # Half up, in integers, so 2.5 % prints as 3 % the way the seed's author rounded.
    return (200 * part + total) // (2 * total) if total else 0


def _seconds(value: str | None) -> float | None:
    """Return `value` as seconds in 0..MAX_SECONDS, None otherwise (nan, inf, 1e8, -1, junk)."""
    try:
        s = float(value) if value is not None else None
    except ValueError:
        return None
    return s if s is not None and 0.0 <= s <= MAX_SECONDS else None  # nan fails both


def _conn_key(event: Event, index: int) -> ConnKey:
    conn, pid = event.get("conn"), event.get("pid")
    if conn is None and pid is None:
        return ("#line", str(index))
    return (conn or "", pid or "")


def _enforced(event: Event) -> bool:
    return event.get("mode") != "warn"


def _giveups(events: Iterable[Event]) -> tuple[list[float], list[float], int]:
    """Return (LC elapsed list, PL elapsed list, lines skipped for a bad elapsed)."""
    skipped = 0
    pipelined: dict[ConnKey, float] = {}
    lost: dict[ConnKey, float] = {}
    tarpitted: set[ConnKey] = set()
    for index, event in enumerate(events):
        name = event.get("event")
        if name == "tarpit_start" and _enforced(event):
            tarpitted.add(_conn_key(event, index))
        # pipelining's default action is warn (log only): its mode=warn line still counts
        # when the connection was really tarpitted; a warn-mode tarpit_lost never does
        if name == "pipelining" and not _enforced(event) and _conn_key(event, index) not in tarpitted:
            continue
        if name not in ("pipelining", "tarpit_lost") or (name == "tarpit_lost" and not _enforced(event)):
            continue
        seconds = _seconds(event.get("elapsed"))
        if seconds is None:
            if "elapsed" in event:
                skipped += 1
            continue
        target = pipelined if name == "pipelining" else lost
        target.setdefault(_conn_key(event, index), seconds)
    lc = [s for key, s in lost.items() if key not in pipelined]
    return lc, list(pipelined.values()), skipped


def _row_buckets(present: Iterable[int], size: int) -> list[int]:
    """Return the buckets that get a row: those present, and runs of <= GAP_ROWS empty ones between."""
    out: list[int] = []
    last = -size  # so that a short run of empty buckets from 0 up is printed too
    for b in sorted(present):
        if (b - last) // size - 1 <= GAP_ROWS:
            out.extend(range(last + size, b, size))
        out.append(b)
        last = b
    return out


def giveup_table(events: Iterable[Event], bucket: int = 10,
                 marks: Iterable[int] = (35, 45, 65)) -> GiveupTable:
    """Return seed 000's table over `events` (parsed log dicts).

    Rows run from bucket 0 to the highest bucket seen; empty buckets get a
    zero row when at most GAP_ROWS of them come in a row (seed 000's shape),
    a longer run is left out.  Percentages are of the total and rounded half
    up.  A cumulative row counts connections that gave up at less than `mark`
    seconds.  Lines whose elapsed is missing are ignored; not a number in
    0..MAX_SECONDS, counted in `skipped`.  Raises ValueError if bucket < 1.
    """
    if bucket < 1:
        raise ValueError("bucket must be at least 1 second")
    lc, pl, skipped = _giveups(events)
    lc_by = Counter(bucket_of(s, bucket) for s in lc)
    pl_by = Counter(bucket_of(s, bucket) for s in pl)
    total = len(lc) + len(pl)
    rows = tuple(
        GiveupRow(b, lc_by[b], pl_by[b], _percent(lc_by[b] + pl_by[b], total))
        for b in _row_buckets({*lc_by, *pl_by}, bucket)
    )
    everyone = lc + pl
    cumulative = tuple(
        CumulativeRow(m, n, _percent(n, total))
        for m in marks
        for n in [sum(1 for s in everyone if s < m)]
    )
    return GiveupTable(bucket, rows, total, cumulative, skipped)


@dataclass
class _ConnState:
    suspicious: bool = False
    lost: bool = False
    greylisted: bool = False
    passed: bool = False
    cls: str = ""
    name: str = ""
    named: bool = False
    rule: str = ""
    end: str = ""
    msgs: int | None = None  # the end line's msgs= (None: a log from before it existed)
    backend_error: bool = False


def _connections(events: Iterable[Event]) -> dict[ConnKey, _ConnState]:
    """Return each connection's state after all its lines (funnel and upkeep list share it)."""
    conns: dict[ConnKey, _ConnState] = {}
    for index, event in enumerate(events):
        state = conns.setdefault(_conn_key(event, index), _ConnState())
        _advance(state, event)
    return conns


def funnel(events: Iterable[Event]) -> Funnel:
    """Return seed 001's funnel over `events`, counting distinct connections.

    connections: any line seen; suspicious: class=suspicious; lost in tarpit:
    an enforced tarpit_lost; greylisted: at least one enforced greylist_defer;
    passed: a suspicious connection whose last tarpit_done / greylist_pass was
    not followed by an enforced reject (helo_reject, rcpt_reject,
    greylist_defer, pregreet).  A connection is identified by conn and pid.
    """
    conns = _connections(events)
    values = conns.values()
    return Funnel(
        connections=len(conns),
        suspicious=sum(c.suspicious for c in values),
        lost_in_tarpit=sum(c.lost for c in values),
        greylisted=sum(c.greylisted for c in values),
        passed=sum(c.suspicious and c.passed for c in values),
    )


def _advance(state: _ConnState, event: Event) -> None:
    cls = event.get("class")
    if cls == "suspicious":
        state.suspicious = True
    if cls and cls != "-" and not state.cls:
        state.cls = cls
    # the name a line carries once the client is classified (after TARPIT_RDNS's own
    # lookup) wins over an earlier line's; the address stands in for no name
    host, ip = event.get("host"), event.get("ip")
    if host and host != "-":
        state.name, state.named = host, True
    elif not state.named and ip and ip != "-":
        state.name = ip
    if not state.rule and event.get("rule") not in (None, "", "-"):
        state.rule = event["rule"]
    name = event.get("event")
    if name == "end":
        state.end = event.get("reason") or "-"
        msgs = event.get("msgs")
        state.msgs = int(msgs) if msgs is not None and msgs.isdigit() else None
    elif name == "error" and event.get("what") == "backend":
        state.backend_error = True
    if not _enforced(event):
        return
    if name == "tarpit_lost":
        state.lost = True
    if name == "greylist_defer":
        state.greylisted = True
    if name in _PASSES:
        state.passed = True
    elif name in _REJECTS:
        state.passed = False


def top_reasons(events: Iterable[Event], n: int = 10) -> tuple[ReasonCount, ...]:
    """Return the `n` most frequent (event, reason) pairs among enforced refusals.

    Counts helo_reject / rcpt_reject / greylist_defer by reason=, error by
    what=, pregreet as reason "pregreet".  Ties are ordered by event, reason.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for event in events:
        name = event.get("event", "")
        if name not in _REASON_FIELD or not _enforced(event):
            continue
        field = _REASON_FIELD[name]
        reason = event.get(field, "-") if field else name
        counts[(name, reason or "-")] += 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(ReasonCount(e, r, c) for (e, r), c in ordered[:max(n, 0)])


def warn_counts(events: Iterable[Event]) -> tuple[WarnCount, ...]:
    """Return, per event, how many mode=warn lines there were ("would tarpit" …).

    Counts lines, most frequent first; an event without a known label is shown
    as "would <event>".
    """
    counts: Counter[str] = Counter(
        e.get("event", "") for e in events if not _enforced(e)
    )
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(WarnCount(_WOULD.get(e, f"would {e}"), e, c) for e, c in ordered)


def tls_share(events: Iterable[Event]) -> TlsShare:
    """Return how many connections ended (an `end` line) and how many of them encrypted.

    A connection is encrypted when an `end` line of it carries tls=1 (the
    wrapper terminated TLS or passed it through).  `terminated` / `passthrough`
    split those by a `tls` / `tls_passthrough` line of the same connection (a
    log that starts mid-connection may have neither).  Percent is of `ended`,
    half up.  Connections are identified by conn and pid.
    """
    ended: set[ConnKey] = set()
    encrypted: set[ConnKey] = set()
    seen: dict[str, set[ConnKey]] = {"tls": set(), "tls_passthrough": set(),
                                     "tls_failed": set(), "exec": set()}
    for index, event in enumerate(events):
        name = event.get("event", "")
        key = _conn_key(event, index)
        if name == "end":
            ended.add(key)
            if event.get("tls") == "1":
                encrypted.add(key)
        elif name in seen:
            seen[name].add(key)
    return TlsShare(
        ended=len(ended),
        encrypted=len(encrypted),
        percent=_percent(len(encrypted), len(ended)),
        terminated=len(encrypted & seen["tls"]),
        passthrough=len(encrypted & seen["tls_passthrough"]),
        failed=len(seen["tls_failed"]),
        fast_path=len(seen["exec"] - ended),
    )


def network_of(ip: str | None) -> str:
    """Return the client network of an ip= value: its /24 (IPv4) or /64 (IPv6), else "-".

    An IPv4-mapped IPv6 address ("::ffff:192.0.2.7") counts as its IPv4 /24;
    a zone ("fe80::1%eth0") is dropped.  Never raises.
    """
    try:
        addr = ipaddress.ip_address((ip or "").strip())
    except ValueError:
        return "-"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((int(addr), 24), strict=False))
    return str(ipaddress.IPv6Network((int(addr), 64), strict=False))


def _ordered_auth(counts: Mapping[str, list[int]]) -> list[AuthCount]:
    rows = [AuthCount(k, ok, fail) for k, (ok, fail) in counts.items()]
    return sorted(rows, key=lambda r: (-r.fail, -r.ok, r.key))


def auth_summary(events: Iterable[Event], top: int = 10) -> AuthSummary:
    """Return ok / fail counts of `auth` lines, per mechanism and per client network.

    result=ok counts as ok, any other result as a failure.  Networks come from
    ip= by `network_of`; only networks with a failure are listed, at most
    `top`, most failures first (then most ok, then by name).  Mechanisms are
    upper-cased and ordered the same way, also at most `top` (the client names
    them, so there may be any number).
    """
    ok = fail = 0
    mechs: dict[str, list[int]] = {}
    nets: dict[str, list[int]] = {}
    for event in events:
        if event.get("event") != "auth":
            continue
        slot = 0 if event.get("result") == "ok" else 1
        if slot:
            fail += 1
        else:
            ok += 1
        mechs.setdefault((event.get("mech") or "-").upper(), [0, 0])[slot] += 1
        nets.setdefault(network_of(event.get("ip")), [0, 0])[slot] += 1
    failing = [r for r in _ordered_auth(nets) if r.fail]
    return AuthSummary(ok, fail, tuple(_ordered_auth(mechs)[:max(top, 0)]),
                       tuple(failing[:max(top, 0)]), len(failing))


def error_summary(events: Iterable[Event], top: int = 10) -> ErrorSummary:
    """Return `error` lines counted by what= (at most `top`), and the greylist store's.

    `greylist`: lines with what=greylist (the store failed; the wrapper fails
    open, so taRgrey is off for that call); `greylist_connections`: distinct
    connections that had one; `greylist_details`: the 3 most frequent detail=
    texts, as ReasonCount("greylist", detail, count).
    """
    by_what: Counter[str] = Counter()
    details: Counter[str] = Counter()
    conns: set[ConnKey] = set()
    for index, event in enumerate(events):
        if event.get("event") != "error":
            continue
        what = event.get("what") or "-"
        by_what[what] += 1
        if what == "greylist":
            details[event.get("detail") or "-"] += 1
            conns.add(_conn_key(event, index))

    def ordered(counts: Counter[str], n: int) -> tuple[ReasonCount, ...]:
        pairs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(n, 0)]
        return tuple(ReasonCount("error", k, c) for k, c in pairs)

    return ErrorSummary(
        total=sum(by_what.values()),
        by_what=ordered(by_what, top),
        greylist=by_what["greylist"],
        greylist_connections=len(conns),
        greylist_details=tuple(ReasonCount("greylist", r.reason, r.count)
                               for r in ordered(details, 3)),
    )


def delivered_suspicious(events: Iterable[Event], top: int = UPKEEP_TOP) -> tuple[NameCount, ...]:
    """Return the `top` suspicious clients that most often delivered, most connections first.

    Per connection (conn and pid): class=suspicious; passed (an enforced
    tarpit_done or a greylist_pass, as below); and the `end` line's msgs= (the
    messages the backend accepted) at least 1.  Logs written before `end`
    carried msgs= are read the old way: "delivered" from what they have: passed (an
    enforced tarpit_done or a greylist_pass, not followed by an enforced
    helo_reject, rcpt_reject, greylist_defer or pregreet: the funnel's
    "passed"); an `end` line whose reason is one of ENDED_NORMALLY (after
    QUIT and 221 the end is backend_closed or client_closed, whichever side
    closed first); and no `error what=backend` (a backend that died also ends
    backend_closed).  A connection whose end is not in the log is left out.
    `name` is the host= value, the ip= value when the client had no name;
    connections without either are left out.  Ties by name.
    """
    counts: Counter[str] = Counter()
    rules: dict[str, str] = {}
    for state in _connections(events).values():
        if state.msgs is not None and state.end:  # the end line counts the messages accepted
            delivered = state.suspicious and state.passed and state.msgs > 0 and bool(state.name)
        else:  # older logs: read it from the way the connection ended
            delivered = (state.suspicious and state.passed and state.end in ENDED_NORMALLY
                         and not state.backend_error and bool(state.name))
        if delivered:
            counts[state.name] += 1
            rules.setdefault(state.name, state.rule or "-")
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(top, 0)]
    return tuple(NameCount(n, c, rules[n]) for n, c in ordered)


def _pairs(counts: Mapping[tuple[str, ...], int]) -> Pairs:
    return tuple(sorted(counts.items()))


def totals(events: Iterable[Event]) -> Totals:
    """Return every count the Prometheus output needs, uncut (see Totals).

    Connections are distinct by conn and pid; the other counts are lines,
    except greet_lost (connections).  Never raises.
    """
    listed = list(events)
    conns = _connections(listed)
    greet: set[ConnKey] = set()
    counts: dict[str, Counter[tuple[str, ...]]] = {
        k: Counter() for k in ("deferrals", "passes", "refusals", "warn", "ends", "errors", "auth")}
    sat = 0
    for index, event in enumerate(listed):
        name = event.get("event", "")
        enforced = _enforced(event)
        if not enforced:
            counts["warn"][(name,)] += 1
        elif name == "tarpit_done":
            sat += 1
        elif name == "greylist_defer":
            counts["deferrals"][(event.get("reason") or "-",)] += 1
        elif name in _REFUSALS:
            counts["refusals"][(name, event.get("reason") or name)] += 1
        if name == "greet_lost":
            greet.add(_conn_key(event, index))
        elif name == "greylist_pass":
            counts["passes"][(event.get("reason") or "-",)] += 1
        elif name == "end":
            counts["ends"][(event.get("reason") or "-",)] += 1
        elif name == "error":
            counts["errors"][(event.get("what") or "-",)] += 1
        elif name == "auth":
            mech = (event.get("mech") or "-").upper()
            counts["auth"][(mech if mech in AUTH_MECHANISMS else "other",
                            "ok" if event.get("result") == "ok" else "fail")] += 1
    by_class = Counter((c.cls or "none",) for c in conns.values())
    return Totals(connections=_pairs(by_class), greet_lost=len(greet), sat_through=sat,
                  **{k: _pairs(v) for k, v in counts.items()})


def build_report(events: Iterable[Event], bucket: int = 10,
                 marks: Iterable[int] = (35, 45, 65), top: int = 10,
                 names: int = UPKEEP_TOP) -> Report:
    """Return the whole Report over `events`; raises ValueError if bucket < 1.

    `names`: how many entries the upkeep list (delivered_suspicious) keeps.
    """
    listed = list(events)
    return Report(
        events=len(listed),
        giveup=giveup_table(listed, bucket, tuple(marks)),
        funnel=funnel(listed),
        reasons=top_reasons(listed, top),
        warn=warn_counts(listed),
        tls=tls_share(listed),
        auth=auth_summary(listed, top),
        errors=error_summary(listed, top),
        delivered=delivered_suspicious(listed, names),
        totals=totals(listed),
    )


def report_to_dict(report: Report) -> dict[str, object]:
    """Return `report` as plain dicts and lists, ready for json.dumps."""
    g = report.giveup
    return {
        "events": report.events,
        "giveup": {
            "bucket": g.bucket_size,
            "rows": [{"seconds": r.bucket, "lc": r.lc, "pl": r.pl, "percent": r.percent}
                     for r in g.rows],
            "total": g.total,
            "cumulative": [{"up_to": c.mark, "count": c.count, "percent": c.percent}
                           for c in g.cumulative],
            "skipped": g.skipped,
        },
        "funnel": {
            "connections": report.funnel.connections,
            "suspicious": report.funnel.suspicious,
            "lost_in_tarpit": report.funnel.lost_in_tarpit,
            "greylisted": report.funnel.greylisted,
            "passed": report.funnel.passed,
        },
        "top_reasons": [{"event": r.event, "reason": r.reason, "count": r.count}
                        for r in report.reasons],
        "warn": [{"label": w.label, "event": w.event, "count": w.count}
                 for w in report.warn],
        "tls": {
            "ended": report.tls.ended,
            "encrypted": report.tls.encrypted,
            "percent": report.tls.percent,
            "terminated": report.tls.terminated,
            "passthrough": report.tls.passthrough,
            "failed": report.tls.failed,
            "fast_path": report.tls.fast_path,
        },
        "auth": {
            "ok": report.auth.ok,
            "fail": report.auth.fail,
            "mechanisms": [{"mech": m.key, "ok": m.ok, "fail": m.fail}
                           for m in report.auth.mechanisms],
            "networks": [{"network": n.key, "fail": n.fail, "ok": n.ok}
                         for n in report.auth.networks],
            "networks_failing": report.auth.networks_failing,
        },
        "errors": {
            "total": report.errors.total,
            "by_what": [{"what": r.reason, "count": r.count} for r in report.errors.by_what],
            "greylist": report.errors.greylist,
            "greylist_connections": report.errors.greylist_connections,
            "greylist_details": [{"detail": r.reason, "count": r.count}
                                 for r in report.errors.greylist_details],
        },
        "delivered_suspicious": [{"name": n.name, "count": n.count, "rule": n.rule}
                                 for n in report.delivered],
    }


def format_report(report: Report) -> str:
    """Return the text report: seed 000's table, seed 001's funnel, reasons, warn, TLS, AUTH,
    errors, and the suspicious clients that delivered."""
    parts = [_format_giveup(report.giveup), _format_funnel(report.funnel),
             _format_reasons(report.reasons)]
    if report.warn:
        parts.append(_format_warn(report.warn))
    parts += [_format_tls(report.tls), _format_auth(report.auth), _format_errors(report.errors),
              _format_delivered(report.delivered)]
    return "\n\n".join(parts) + "\n"


def _format_giveup(g: GiveupTable) -> str:
    lines = [
        "Gave up during the tarpit (LC = lost connection, PL = talked before our reply)",
        f"seconds rounded to the nearest {g.bucket_size} s",
        "",
        f"{'seconds':>7}  {'LC':>7}  {'PL':>7}  {'%':>4}",
    ]
    last = -g.bucket_size
    for r in g.rows:
        if r.bucket != last + g.bucket_size:
            lines.append(f"{'...':>7}")  # a long run of empty buckets left out
        lines.append(f"{r.bucket:>7}  {r.lc:>7}  {r.pl:>7}  {r.percent:>3}%")
        last = r.bucket
    lines += ["", f"{'total':<13}{g.total:>7}"]
    lines += [f"{f'up to {c.mark} s':<13}{c.count:>7}  {c.percent:>3}%" for c in g.cumulative]
    if g.skipped:
        lines.append(f"left out: {g.skipped} lines whose elapsed was not a number "
                     f"in 0..{MAX_SECONDS:.0f} s")
    return "\n".join(lines)


def _format_funnel(f: Funnel) -> str:
    stages = [
        ("connections", f.connections),
        ("  suspicious (S25R)", f.suspicious),
        ("  lost in tarpit", f.lost_in_tarpit),
        ("  greylisted", f.greylisted),
        ("  passed", f.passed),
    ]
    lines = ["Funnel (connections)"]
    lines += [f"{name:<22}{n:>9}  {_percent(n, f.connections):>3}%" for name, n in stages]
    return "\n".join(lines)


def _format_reasons(reasons: tuple[ReasonCount, ...]) -> str:
    lines = ["Top reasons"]
    lines += [f"  {printable(r.event, _FIELD):<16}{printable(r.reason, _FIELD):<24}{r.count:>9}"
              for r in reasons]
    if not reasons:
        lines.append("  (none)")
    return "\n".join(lines)


def _format_warn(warn: tuple[WarnCount, ...]) -> str:
    lines = ["Warn mode (not enforced)"]
    lines += [f"  {printable(w.label, _FIELD):<30}{w.count:>9}" for w in warn]
    return "\n".join(lines)


def _format_tls(t: TlsShare) -> str:
    lines = [
        "TLS (connections with an end line)",
        f"{'ended':<22}{t.ended:>9}",
        f"{'  encrypted (tls=1)':<22}{t.encrypted:>9}  {t.percent:>3}%",
        f"{'    terminated here':<22}{t.terminated:>9}",
        f"{'    pass-through':<22}{t.passthrough:>9}",
        f"{'handshake failed':<22}{t.failed:>9}",
        f"{'fast path (exec)':<22}{t.fast_path:>9}  (their TLS is the backend's: not in the log)",
    ]
    return "\n".join(lines)


def _format_auth(a: AuthSummary) -> str:
    lines = ["AUTH (the backend's answer)", f"{'ok':<22}{a.ok:>9}", f"{'failed':<22}{a.fail:>9}"]
    if a.mechanisms:
        lines.append(f"  {'mechanism':<28}{'failed':>9}{'ok':>9}")
        lines += [f"  {printable(m.key, _FIELD):<28}{m.fail:>9}{m.ok:>9}" for m in a.mechanisms]
    if a.networks:
        lines.append(f"  {'failures by network':<28}{'failed':>9}{'ok':>9}")
        lines += [f"  {printable(n.key, _FIELD):<28}{n.fail:>9}{n.ok:>9}" for n in a.networks]
        if a.networks_failing > len(a.networks):
            lines.append(f"  ... {a.networks_failing - len(a.networks)} more networks with failures")
    return "\n".join(lines)


def _format_errors(e: ErrorSummary) -> str:
    lines = ["Errors (error lines by what=)"]
    lines += [f"  {printable(r.reason, _FIELD):<28}{r.count:>9}" for r in e.by_what]
    if not e.by_what:
        lines.append("  (none)")
    if e.greylist:
        lines.append(f"greylist store errors: {e.greylist} lines in {e.greylist_connections} "
                     f"connections (it fails open: no greylisting for those)")
        lines += [f"  {r.count:>7} x \"{printable(r.reason, _DETAIL)}\"" for r in e.greylist_details]
    return "\n".join(lines)


def _format_delivered(names: tuple[NameCount, ...]) -> str:
    lines = ["Suspicious clients that delivered (candidates for s25r-allow)",
             f"  {'name':<52}{'connections':>12}  rule"]
    lines += [f"  {printable(n.name, _HOST):<52}{n.count:>12}  {printable(n.rule, 4)}"
              for n in names]
    if not names:
        lines.append("  (none)")
    return "\n".join(lines)


# --- Prometheus text exposition format (node_exporter's textfile collector) ----------

PROMETHEUS_PREFIX = "tarpit_smtpd_"


def metrics(report: Report) -> tuple[Metric, ...]:
    """Return the report's counters as Prometheus metric families, names tarpit_smtpd_*.

    Totals over the lines the report was built from (a file rotated away
    lowers them: Prometheus's rate() and increase() read that as a reset).
    Raises ValueError if the report has no Totals (built without build_report).
    """
    t = report.totals
    if t is None:
        raise ValueError("the report has no totals: build it with build_report")
    f, tls = report.funnel, report.tls

    def fam(name: str, text: str, labels: tuple[str, ...],
            samples: Iterable[tuple[tuple[str, ...], float]]) -> Metric:
        return Metric(PROMETHEUS_PREFIX + name, text, "counter", labels, tuple(samples))

    one = (lambda n: (((), n),))
    return (
        fam("log_lines_total", "Lines of tarpit-smtpd read from the log files.", (), one(report.events)),
        fam("connections_total", "Connections seen, by the class the client was given "
            "(none: refused before it was classified).", ("class",), t.connections),
        fam("fast_path_total", "Connections handed to the backend by exec (nothing more of "
            "theirs is logged).", (), one(tls.fast_path)),
        fam("giveups_total", "Connections whose client hung up during a pause: greet "
            "(greet_lost) or tarpit (an enforced tarpit_lost).", ("pause",),
            ((("greet",), t.greet_lost), (("tarpit",), f.lost_in_tarpit))),
        fam("pipelining_total", "Tarpitted connections that talked before our reply "
            "(PL in the give-up table).", (), one(sum(r.pl for r in report.giveup.rows))),
        fam("tarpit_sat_through_total", "Tarpits sat through to the end (enforced tarpit_done "
            "lines).", (), one(t.sat_through)),
        fam("greylist_deferrals_total", "Greylist deferrals (450), by reason.", ("reason",),
            t.deferrals),
        fam("greylist_passes_total", "Recipients the greylist let through, by reason.",
            ("reason",), t.passes),
        fam("passed_total", "Suspicious connections that got through the tarpit or greylist "
            "and were not refused after it (the funnel's passed).", (), one(f.passed)),
        fam("refusals_total", "Enforced refusals other than the greylist, by event and reason.",
            ("event", "reason"), t.refusals),
        fam("warn_total", "Lines logged with mode=warn (what would have been done), by event.",
            ("event",), t.warn),
        fam("ends_total", "Connections that ended (end lines), by reason.", ("reason",), t.ends),
        fam("errors_total", "Error lines, by what failed.", ("what",), t.errors),
        fam("tls_total", "Connections by what became of TLS: terminated here, passed through "
            "to the backend, handshake failed.", ("result",),
            ((("failed",), tls.failed), (("passthrough",), tls.passthrough),
             (("terminated",), tls.terminated))),
        fam("encrypted_total", "Connections whose end line says the client side was "
            "encrypted (tls=1).", (), one(tls.encrypted)),
        fam("auth_total", "AUTH exchanges the backend answered, by mechanism (other: a name "
            "outside the usual ones) and result.", ("mech", "result"), t.auth),
    )


def _label_value(text: str) -> str:
    # the exposition format's escapes for label values: backslash, double quote, line feed
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_prometheus(families: Iterable[Metric]) -> str:
    """Return `families` in the Prometheus text exposition format (version 0.0.4).

    Each family: one # HELP and one # TYPE line, then its samples, one line
    each; label values escaped (backslash, double quote, line feed).  A family
    without samples still gets its HELP and TYPE.  Raises ValueError for a
    name or label name the format does not allow, or a family named twice.
    """
    out: list[str] = []
    seen: set[str] = set()
    for m in families:
        for word in (m.name, *m.labels):
            if not _METRIC_NAME.fullmatch(word) or (word in m.labels and ":" in word):
                raise ValueError(f"not a valid Prometheus name: {word!r}")
        if m.name in seen:
            raise ValueError(f"metric {m.name} given twice")
        seen.add(m.name)
        out += [f"# HELP {m.name} {_help_text(m.help)}", f"# TYPE {m.name} {m.type}"]
        for values, value in m.samples:
            pairs = ",".join(f'{k}="{_label_value(v)}"' for k, v in zip(m.labels, values))
            out.append(f"{m.name}{{{pairs}}} {_number(value)}" if pairs else f"{m.name} {_number(value)}")
    return "\n".join(out) + "\n"
