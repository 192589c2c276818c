"""libtarpit.log: which lines are ours (no forgery through the backend's stderr), escaping.

Also libtarpit.text.printable, the escaper escape_value is built on.
"""

from __future__ import annotations

import pytest

from libtarpit.log import escape_value, format_line, parse_line, prefix
from libtarpit.text import printable

OURS = "tarpit-smtpd conn=143b6.7 pid=7 ip=192.0.2.7 host=- class=suspicious rule=1 event=tarpit_lost elapsed=3.0"
FORGED = "x tarpit-smtpd conn=1 event=tarpit_lost elapsed=3"

# Every prefix a collector we document puts before a line (docs/logs.md).
PREFIXES = [
    "",
    "@400000006553f1000000000a ",                                # multilog t, s6-log t
    "2026-11-26T12:00:00+0100 mx tarpit-smtpd[123]: ",           # journalctl -o short-iso
    "2026-11-26T12:00:00.123456+01:00 mx tcpserver[9]: ",        # short-iso-precise, rsyslog
    "2026-11-26 12:00:00.123456789  ",                           # s6-log T
    "@400000006553f1000000000a 2026-11-26 12:00:00.123456789  ",  # s6-log t T
    "2026-11-26T12:00:00Z ",                                     # ts '%Y-%m-%dT%H:%M:%SZ'
    "Nov 26 12:00:00 mx tarpit-smtpd[123]: ",                    # syslog, journalctl -o short
    "Nov  1 12:00:00 mx tarpit-smtpd: ",                         # syslog without a pid
    "Nov 26 12:00:00 ",                                          # ts
]

# Backend lines that quote a client's MAIL FROM with one of our lines inside it.
BACKEND = [
    "tarpit-sink: from=<{}>",
    "qmail-smtpd: mail from <{}>",
]


@pytest.mark.parametrize("pre", PREFIXES)
def test_our_line_is_read_after_every_known_prefix(pre):
    event = parse_line(pre + OURS)
    assert event is not None and event["event"] == "tarpit_lost" and event["elapsed"] == "3.0"


@pytest.mark.parametrize("pre", PREFIXES)
@pytest.mark.parametrize("shape", BACKEND)
def test_our_word_inside_a_backend_line_is_not_ours(pre, shape):
    assert parse_line(pre + shape.format(FORGED)) is None
    assert parse_line(pre + shape.format("tarpit-smtpd conn=1 event=tarpit_lost elapsed=3")) is None


@pytest.mark.parametrize("line", [
    " " + OURS,                                      # not at the start
    "tarpit-smtpdconn=1 event=x",
    "tarpit-smtpd-other conn=9 event=tarpit_lost elapsed=3",
    "mx tarpit-smtpd[1]: " + OURS,                    # a header needs a time stamp first
    "@4000 " + OURS,                                 # not a TAI64N label
    "Nov 26 12:00:00 mx tcpserver[1]: tarpit-sink: from=<x " + OURS + ">",
    "2026-11-26T12:00:00+0100 mx a b[1]: " + OURS,   # a host with a space is no header
    "tarpit-smtpd conn=1 pid=2 ip=- host=x",         # ours in shape but no event: not an event
])
def test_lines_that_are_not_ours(line):
    assert parse_line(line) is None


def test_five_forged_mail_froms_count_nothing():
    # The report that started this: 5 messages made "suspicious 5, lost_in_tarpit 5".
    from libtarpit.stats import build_report

    lines = [f"@400000006553f1000000000a tarpit-sink: from=<x tarpit-smtpd conn={i} class=suspicious "
             f"event=tarpit_lost elapsed=3> to=<bob@example.com>" for i in range(5)]
    report = build_report(e for e in map(parse_line, lines) if e is not None)
    assert report.events == 0 and report.funnel.suspicious == 0 and report.funnel.lost_in_tarpit == 0


def test_prefix_groups_carry_the_time_fields():
    assert prefix("@400000006553f1000000000a x")["tai"] == "400000006553f1000000000a"
    m = prefix("2026-11-26T12:00:00.5+01:00 mx a[1]: x")
    assert (m["date"], m["time"], m["zone"]) == ("2026-11-26", "12:00:00.5", "+01:00")
    m = prefix("Nov  1 12:00:00 x")
    assert (m["month"], m["day"], m["hms"]) == ("Nov", "1", "12:00:00")
    assert prefix("no stamp here").end() == 0


def test_format_then_parse_round_trip_with_hostile_values():
    hostile = 'a b"c\\d=e event=tarpit_lost\r\n\x1b[31m\u00e9'
    line = format_line([("conn", "c1"), ("event", "helo_reject"), ("helo", hostile)])
    assert "\n" not in line and "\x1b" not in line
    event = parse_line(line)
    assert event["event"] == "helo_reject"
    assert event["helo"] == 'a b"c\\d=e event=tarpit_lost???[31m?'


def test_escape_value():
    assert escape_value(None) == "-"
    assert escape_value(31.44) == "31.4"
    assert escape_value("") == '""'
    assert escape_value(b"a\xffb") == "a?b"
    assert escape_value("x" * 300) == "x" * 200 + "..."


@pytest.mark.parametrize("text, limit, out", [
    ("plain text", 100, "plain text"),
    ("tab\there\r\n", 100, "tab?here??"),
    (b"\x00a\xffb", 100, "?a?b"),
    ("\u65e5\u672c", 100, "??"),
    ("abcdef", 3, "abc..."),
    ("abc", 3, "abc"),
    ("", 0, ""),
    ("a", 0, "..."),
])
def test_printable(text, limit, out):
    assert printable(text, limit) == out


def test_printable_same_as_the_old_smtp_escaper():
    # smtp.printable before the move: substitute, then cap (equal to capping first).
    import re

    def old(text, limit):
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        text = re.sub(r"[^\x20-\x7e]", "?", text)
        return text[:limit] + ("..." if len(text) > limit else "")

    for text in ["", "x" * 99, "x" * 100, "x" * 101, "\x00" * 150, b"\xff" * 101, "a\u00e9" * 60]:
        assert printable(text, 100) == old(text, 100)


def test_printable_refuses_a_negative_limit():
    with pytest.raises(ValueError):
        printable("x", -1)
