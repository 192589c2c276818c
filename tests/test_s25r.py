"""S25R rules, extra patterns, the allow-list, the shipped list and `tarpitctl s25r`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libtarpit.errors import ControlError
import re

from libtarpit import s25r
from libtarpit.s25r import AllowList, Verdict, classify, explain, match_rule, server_hint

SHIPPED = Path(__file__).resolve().parent.parent / "control-examples" / "s25r-allow"

# --- the rules -------------------------------------------------------------

RULE_POSITIVES = {
    # rule 1: two digit runs split by non-digits in the first label
    1: ["p6041-ip02funabasi.chiba.ocn.ne.jp", "p8554011-ipngn42901marunouchi.tokyo.ocn.ne.jp",
        "c-67-167-10-21.hsd1.il.comcast.net", "127-0.example.net", "nn23n148.smc.co.jp"],
    # rule 2: five digits in a row in the first label
    2: ["YahooBB220030220074.bbtec.net", "pcp04083532pcs.levtwn01.pa.comcast.net",
        "ZT095051.ppp.dion.ne.jp"],
    # rule 3: first or second label starts with a digit, at least 4 labels, letter TLD
    3: ["203.138.20.138.eo.eaccess.ne.jp", "host.1x.example.co.jp", "3.a.b.jp"],
    # rule 4: first label ends in a digit, second has digit-digit
    4: ["wbar9.chi1-4-11-085-222.dsl-verizon.net", "m226.net81-66-158.noos.fr"],
    # rule 5: first two labels end in digits, five or more labels
    5: ["host2.pool7.example.ne.jp", "k1.fl26.tokyo.example.ne.jp"],
    # rule 6: dhcp / dialup / ppp / xDSL first label with a digit
    6: ["adsl9.example.com", "dhcpx3.example.net", "ppp7.isp.example.jp", "vdsl42.isp.example",
        "dialup5.isp.example"],
}

NEGATIVES = [
    "mail.example.com", "smtp1.example.com", "mx01.example.jp", "mail12.us5.mcsv.net",
    "1.example.com",           # rule 3 needs four labels
    "a.b.1c.example.jp",       # rule 3 looks only at the first two labels
    "mail1.srv-2.example.com",  # rule 4 needs a digit before the hyphen
    "mydsl1.example.com",      # rule 6 wants the keyword at the start
    "dhcp.example.com",        # rule 6 wants a digit in the first label
    "db229.mta.exacttarget.com", "out-22.smtp.github.com",
]


@pytest.mark.parametrize("rule,name", [(r, n) for r, ns in RULE_POSITIVES.items() for n in ns])
def test_each_rule_matches_its_examples(rule: int, name: str) -> None:
    assert match_rule(name) == rule


@pytest.mark.parametrize("name", NEGATIVES)
def test_server_like_names_match_no_rule(name: str) -> None:
    assert match_rule(name) is None
    assert not classify(name, "192.0.2.1").suspicious


@pytest.mark.parametrize("name", [None, "", "unknown", "UNKNOWN", "unknown.", "."])
def test_no_reverse_name_is_rule_0(name: str | None) -> None:
    assert match_rule(name) == 0
    verdict = classify(name, "192.0.2.1")
    assert verdict == Verdict(rule=0, allowed_by=None)
    assert verdict.suspicious


@pytest.mark.parametrize("name,rule", [
    ("P6041-IP02FUNABASI.CHIBA.OCN.NE.JP", 1), ("ADSL9.Example.COM", 6),
    ("Host.1X.EXAMPLE.CO.JP", 3), ("DialUp5.ISP.example", 6),
])
def test_rules_ignore_case(name: str, rule: int) -> None:
    assert match_rule(name) == rule


def test_trailing_dot_is_ignored() -> None:
    assert match_rule("p6041-ip02funabasi.chiba.ocn.ne.jp.") == 1
    assert match_rule("mail.example.com.") is None
    # rule 5 ends in "\." so a bare 4-label name must not reach it via the root dot
    assert match_rule("host2.pool7.example.jp.") is None


def test_verdict_reason_and_suspicious() -> None:
    assert Verdict(rule=1).reason == "rule 1"
    assert Verdict(rule=None).reason == "no match"
    assert Verdict(rule=1, allowed_by=".google.com").reason == "allow .google.com"
    assert not Verdict(rule=1, allowed_by=".google.com").suspicious
    assert not Verdict(rule=None).suspicious


# --- extra patterns ----------------------------------------------------------

EXTRA_POSITIVES = [
    "customer.pool12.isp.example", "abcdef.dyn.isp.example", "host.dynamic.isp.example",
    "abc.dialin.isp.example", "xyz.cable.isp.example", "home.broadband.isp.example",
    "abc.dip.t-dialin.net", "abc.dsl.isp.example", "myhome.dyndns.org", "me.duckdns.org",
]


@pytest.mark.parametrize("name", EXTRA_POSITIVES)
def test_extra_patterns_off_by_default_on_with_switch(name: str) -> None:
    assert match_rule(name) is None
    assert match_rule(name, extra=True) == 7
    assert classify(name, None, extra=True).suspicious


@pytest.mark.parametrize("name", ["mail.dyn.com", "smtp.pool.example", "mail.example.com",
                                  "mx.dipole-labs.example"])
def test_extra_patterns_spare_provider_domains(name: str) -> None:
    assert match_rule(name, extra=True) is None


def test_s25r_rule_wins_over_extra() -> None:
    assert match_rule("adsl9.dynamic.isp.example", extra=True) == 6


# The rules as one alternation, rule 7 as word sets: the same answers as the
# published patterns tried one by one and the token regex they replaced.
NAME_CHARS = st.text(alphabet="abdlnopsy0123456789.-_ADP", max_size=40)


def _rules_one_by_one(name: str) -> int | None:
    for number, pattern in s25r.RULES.items():
        if pattern.search(name):
            return number
    return None


def _extra_by_regex(name: str) -> bool:
    if re.search(r"(^|\.)(dyndns|dyndns-[a-z]+|dynalias|duckdns|no-ip|ddns|dynu)\.[a-z]+$", name, re.I):
        return True
    token = (r"dyn|dynamic|dynip|dial|dialup|dialin|dip|pool|pppool|dpool|cable|cablemodem"
             r"|catv|broadband|bband|dhcp|ppp|pppoe|[achrsvx]?dsl")
    labels = name.split(".")
    for label in labels[: min(3, len(labels) - 2)]:
        for word in re.split(r"[^a-z]+", label, flags=re.I):
            if word and re.fullmatch(token, word, re.I):
                return True
    return False


@settings(max_examples=500, deadline=None)
@given(NAME_CHARS)
def test_one_alternation_answers_like_the_rules_one_by_one(name: str) -> None:
    host = name.rstrip(".")
    if host and host.lower() != "unknown":
        assert match_rule(name) == _rules_one_by_one(host)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["dyn", "pool", "adsl", "xdsl", "dipole", "mail", "no-ip",
                                 "duckdns", "dyndns-home", "7", "-", "x", "catv2"]),
                min_size=1, max_size=6), st.sampled_from(["org", "example", "jp", "c0m"]))
def test_rule_7_words_answer_like_the_token_regex(parts: list[str], tld: str) -> None:
    name = ".".join(parts) + "." + tld
    if match_rule(name) is None:
        assert (match_rule(name, extra=True) == 7) == _extra_by_regex(name)


# --- mail-server hints -----------------------------------------------------------

# real outbound names from tests/data/s25r-corpus.tsv that S25R flags
HINTED = [
    ("smtp2-g21.free.fr", 1, "smtp"), ("mail-106120.protonmail.ch", 2, "mail"),
    ("mail-01-1.mymagenta.at", 1, "mail"), ("mail-108-mta157.mxroute.com", 1, "mail"),
    ("smtp-out2-04.simnet.is", 1, "smtp"), ("static-71-117-165-76.prvdri.fios.verizon.net", 1, "static"),
]


@pytest.mark.parametrize("name,rule,word", HINTED)
def test_hint_outranks_rules_1_to_5(name: str, rule: int, word: str) -> None:
    verdict = classify(name, "203.0.113.9")
    assert verdict == Verdict(rule=rule, allowed_by=None, hint=word)
    assert not verdict.suspicious and verdict.reason == f"hint {word}"
    assert classify(name, "203.0.113.9", hints=False).suspicious


@pytest.mark.parametrize("name", [
    # measured: no gain once the allow-list has the large senders (docs/s25r.md)
    "mx0e-00007b01.gpphosted.com", "mx-2023-1.gwdg.de", "out1-2.isp.example",
    "mx-relay09-hz1.antispameurope.com", "dedicated-1-2.host.example",
])
def test_words_measured_useless_are_no_hints(name: str) -> None:
    assert server_hint(name) is None
    assert classify(name, None).suspicious


@pytest.mark.parametrize("name", [
    "mail1-2.dsl.isp.example", "smtp-1-2.dynamic.isp.example", "static-1-2.pool.isp.example",
    "mail7-8.cable.isp.example", "smtp1-2-dip.isp.example",
])
def test_hint_never_outranks_a_dynamic_word(name: str) -> None:
    assert server_hint(name) is None
    assert classify(name, None).suspicious and classify(name, None, extra=True).suspicious


@pytest.mark.parametrize("name,rule", [
    ("unknown", 0), ("dhcp7-mail.isp.example", 6), ("ppp9.smtp.isp.example", 6),
])
def test_hint_does_not_outrank_rules_0_and_6(name: str, rule: int) -> None:
    verdict = classify(name, None)
    assert verdict.rule == rule and verdict.hint is None and verdict.suspicious


def test_hint_does_not_outrank_rule_7() -> None:
    verdict = classify("mail.duckdns.org", None, extra=True)
    assert verdict == Verdict(rule=7) and verdict.suspicious


@pytest.mark.parametrize("name", [
    "smtpout01-ext2.partage.renater.fr",  # "smtpout" is not the word "smtp"
    "mailbox1-2.isp.example", "p1-2.mail.example",  # the last two labels never count
    "host1-2.a.b.mail.example",  # only the first three labels count
])
def test_hint_is_a_whole_word_in_the_first_labels(name: str) -> None:
    assert server_hint(name) is None
    assert classify(name, None).suspicious


def test_hint_is_not_looked_for_when_no_rule_or_the_allow_list_decided() -> None:
    assert classify("mail.example.com", None) == Verdict(rule=None)
    allow = AllowList.parse(".free.fr\n")
    assert classify("smtp2-g21.free.fr", None, allow) == Verdict(rule=1, allowed_by=".free.fr")


# --- explain -----------------------------------------------------------------------

def test_explain_names_the_allow_list_entry_and_its_line() -> None:
    shipped = AllowList.load(SHIPPED)
    line = next(i for i, raw in enumerate(SHIPPED.read_text().splitlines(), 1)
                if raw.strip() == ".free.fr")
    verdict, why = explain("smtp2-g21.free.fr", None, shipped)
    assert verdict == Verdict(rule=1, allowed_by=".free.fr")
    assert why[0].startswith(f"decided by: allow-list entry .free.fr ({SHIPPED}:{line}), a name entry")
    assert why[1] == 'rule 1: pattern ^[^.]*[0-9][^0-9.]+[0-9] matched "smtp2-g2"'


def test_explain_an_address_entry() -> None:
    allow = AllowList.parse("# c\n198.51.100.0/24\n", "/ctl/s25r-allow")
    _, why = explain("p1-2.isp.example", "198.51.100.7", allow)
    assert why[0].startswith("decided by: allow-list entry 198.51.100.0/24 (/ctl/s25r-allow:2), "
                             "an address or network entry")


@pytest.mark.parametrize("name,extra,first,second", [
    ("mail-01-1.mymagenta.at", False, 'decided by: mail-server hint "mail" in label "mail-01-1"',
     'rule 1: pattern ^[^.]*[0-9][^0-9.]+[0-9] matched "mail-01-1"'),
    ("YahooBB220030220074.bbtec.net", False, "decided by: rule 2 (first label has 5 or more digits",
     'rule 2: pattern ^[^.]*[0-9]{5} matched "YahooBB220030220074"'),
    ("mail1-2.dsl.isp.example", False, "decided by: rule 1 ",
     'hint "mail" not used: the dynamic-pool word "dsl" is in the same labels'),
    ("unknown", False, "decided by: rule 0 (no reverse name): suspicious",
     'rule 0: no reverse name (TCPREMOTEHOST unset, empty or "unknown")'),
    ("dynamic-red.dhcp.yndx.net", True, "decided by: rule 7 ",
     'rule 7: dynamic-pool word "dynamic" in label "dynamic-red"'),
    ("me.duckdns.org", True, "decided by: rule 7 ",
     "rule 7: the name is under the dynamic-DNS service duckdns.org"),
    ("dynamic-red.dhcp.yndx.net", False, "decided by: no rule matched: not suspicious",
     "rules 1-6: no pattern matches; rule 7 (dynamic-pool words) is off"),
])
def test_explain_says_what_decided_and_why(name: str, extra: bool, first: str, second: str) -> None:
    verdict, why = explain(name, None, extra=extra)
    assert verdict == classify(name, None, extra=extra)
    assert why[0].startswith(first) and why[1] == second


# --- allow-list --------------------------------------------------------------

ALLOW_TEXT = """\
# comment line

.google.com          # suffix
mx.partner.example   # exact
/^mail-.*\\.outbound\\.protection\\.outlook\\.com$/
192.0.2.0/24
2001:db8:25::/48
198.51.100.7
*.wild.example
"""


@pytest.fixture()
def allow() -> AllowList:
    return AllowList.parse(ALLOW_TEXT)


def test_parse_counts_entries(allow: AllowList) -> None:
    assert len(allow) == 7
    assert len(AllowList.parse("")) == 0


def test_suffix_entry_requires_the_dot(allow: AllowList) -> None:
    assert allow.match("mail-yw1-f170.google.com", None) == ".google.com"
    assert allow.match("MAIL-YW1-F170.GOOGLE.COM.", None) == ".google.com"
    assert allow.match("mail-yw1-f170.evilgoogle.com", None) is None
    assert allow.match("google.com.evil.example", None) is None


def test_star_dot_is_a_suffix(allow: AllowList) -> None:
    assert allow.match("a1-2.wild.example", None) == "*.wild.example"
    assert allow.match("notwild.example", None) is None


def test_exact_entry(allow: AllowList) -> None:
    assert allow.match("mx.partner.example", None) == "mx.partner.example"
    assert allow.match("MX.Partner.Example.", None) == "mx.partner.example"
    assert allow.match("mx2.partner.example", None) is None
    assert allow.match("a.mx.partner.example", None) is None


def test_regex_entry_is_case_insensitive(allow: AllowList) -> None:
    name = "MAIL-DB8EUR05ON2090.outbound.protection.outlook.com"
    assert allow.match(name, None) == "/^mail-.*\\.outbound\\.protection\\.outlook\\.com$/"
    assert allow.match("mail-x.outbound.protection.outlook.com.evil.example", None) is None


@pytest.mark.parametrize("ip,entry", [
    ("192.0.2.77", "192.0.2.0/24"), ("198.51.100.7", "198.51.100.7"),
    ("2001:db8:25::1", "2001:db8:25::/48"), ("2001:DB8:25:ffff::9", "2001:db8:25::/48"),
    ("::ffff:192.0.2.5", "192.0.2.0/24"),
])
def test_ip_and_cidr_entries(allow: AllowList, ip: str, entry: str) -> None:
    assert allow.match("p1-2.dyn.example", ip) == entry
    assert allow.match(None, ip, name_trusted=False) == entry


@pytest.mark.parametrize("ip", ["192.0.3.1", "198.51.100.8", "2001:db8:26::1", "not-an-ip", ""])
def test_ip_outside_entries(allow: AllowList, ip: str) -> None:
    assert allow.match("p1-2.dyn.example", ip) is None


def test_untrusted_name_ignores_name_entries_not_ip_entries(allow: AllowList) -> None:
    google = "mail-yw1-f170.google.com"
    assert allow.match(google, "203.0.113.9", name_trusted=False) is None
    verdict = classify(google, "203.0.113.9", allow, name_trusted=False, hints=False)
    assert verdict == Verdict(rule=1, allowed_by=None) and verdict.suspicious
    verdict = classify(google, "192.0.2.9", allow, name_trusted=False, hints=False)
    assert verdict == Verdict(rule=1, allowed_by="192.0.2.0/24") and not verdict.suspicious
    # a hint reads the name as the rules do, trusted or not: it makes the client
    # normal, never trusted (a forger could as well pick a name no rule matches)
    verdict = classify(google, "203.0.113.9", allow, name_trusted=False)
    assert verdict == Verdict(rule=1, allowed_by=None, hint="mail") and not verdict.suspicious


def test_allow_list_wins_and_rule_is_still_reported(allow: AllowList) -> None:
    verdict = classify("mail-yw1-f170.google.com", "203.0.113.9", allow)
    assert verdict == Verdict(rule=1, allowed_by=".google.com")
    assert not verdict.suspicious


def test_allow_listed_client_with_no_rule(allow: AllowList) -> None:
    assert classify("mx.partner.example", None, allow) == Verdict(None, "mx.partner.example")
    assert classify(None, "192.0.2.1", allow) == Verdict(0, "192.0.2.0/24")


@pytest.mark.parametrize("text,line,word", [
    ("/[unclosed/\n", 1, "regex"),
    ("# ok\n.good.example\n192.0.2.0/33\n", 3, "CIDR"),
    ("\n\n300.1.2.3\n", 3, "IP"),
    ("1.2.3.\n", 1, "IP"),
    ("2001:db8::zz\n", 1, "IP"),
    (".ok.example\nfoo bar\n", 2, "one entry"),
    ("//\n", 1, "regex"),
    ("exa mple\n", 1, "one entry"),
    ("bad!name.example\n", 1, "host name"),
])
def test_parse_error_names_the_line(text: str, line: int, word: str) -> None:
    with pytest.raises(ControlError) as info:
        AllowList.parse(text, "/ctl/s25r-allow")
    err = info.value
    assert (err.path, err.line) == ("/ctl/s25r-allow", line)
    assert word in err.reason
    assert str(err).startswith(f"/ctl/s25r-allow:{line}: ")


def test_load_missing_file_is_empty(tmp_path: Path) -> None:
    assert len(AllowList.load(tmp_path / "s25r-allow")) == 0


def test_load_unreadable_file_raises(tmp_path: Path) -> None:
    (tmp_path / "s25r-allow").mkdir()  # a directory: exists, cannot be read as a file
    with pytest.raises(ControlError) as info:
        AllowList.load(tmp_path / "s25r-allow")
    assert info.value.path == str(tmp_path / "s25r-allow") and info.value.line is None


def test_load_bad_file_reports_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "s25r-allow"
    path.write_text(".ok.example\n\n/(/\n")
    with pytest.raises(ControlError) as info:
        AllowList.load(path)
    assert (info.value.path, info.value.line) == (str(path), 3)


# --- the shipped list --------------------------------------------------------

# entry -> realistic outbound names (seen in public Received headers, or the
# provider's documented shape); each must be flagged by bare S25R.
SHIPPED_EXAMPLES = {
    ".google.com": ["mail-yw1-f170.google.com", "mail-pl1-f173.google.com",
                    "mail-pl1-x62a.google.com"],
    ".outbound.protection.outlook.com": ["mail-db8eur05on2090.outbound.protection.outlook.com",
                                         "mail-dbaeur03on2058.outbound.protection.outlook.com",
                                         "mail-os0jpn01on2095.outbound.protection.outlook.com"],
    ".hotmail.com": ["dub004-omc3s21.hotmail.com"],
    ".amazonses.com": ["a48-93.smtp-out.amazonses.com", "a11-124.smtp-out.amazonses.com"],
    ".yahoo.com": ["sonic310-20.consmr.mail.gq1.yahoo.com"],
    ".yahoo.co.jp": ["nh603-vm8.bullet.mail.ssk.yahoo.co.jp"],
    ".mandrillapp.com": ["mail180-16.suw31.mandrillapp.com"],
    ".rsgsv.net": ["mail136-64.atl31.rsgsv.net"],
    ".sendgrid.net": ["o1678950229.outbound-mail.sendgrid.net"],
    ".mailgun.net": ["m43-7.mailgun.net", "so254-9.mailgun.net"],
    ".sparkpostmail.com": ["mta-81-59.sparkpostmail.com"],
    ".me.com": ["pv50p00im-ztdg10021101.me.com"],
    ".zoho.com": ["sender4-pp-f112.zoho.com"],
    ".zoho.eu": ["sender11-op-o11.zoho.eu"],
    ".facebook.com": ["66-220-155-156.mail-mail.facebook.com"],
    ".pphosted.com": ["mx0a-0031df01.pphosted.com"],
    # added after measuring on tests/data/s25r-corpus.tsv (docs/s25r.md, "Measured defaults")
    ".outbound.protection.office365.us": ["mail-bn3usg02on0113.outbound.protection.office365.us"],
    ".outbound.protection.partner.outlook.cn":
        ["mail-sh0chn02hn2236.outbound.protection.partner.outlook.cn"],
    ".protonmail.ch": ["mail-106120.protonmail.ch", "mail-10629.protonmail.ch"],
    ".mail.163.com": ["m13151.mail.163.com"],
    ".126.com": ["m17-178.vip.126.com"],
    ".netease.com": ["mail-m128214.netease.com"],
    ".xmail.ntesmail.com": ["mail-m83129.xmail.ntesmail.com"],
    ".mail.qq.com": ["out162-62-57-210.mail.qq.com"],
    ".mail.aliyun.com": ["out28-73.mail.aliyun.com", "out199-14.us.a.mail.aliyun.com"],
    ".free.fr": ["smtp2-g21.free.fr"],
    ".smtp.rzone.de": ["mo4-p02-ob.smtp.rzone.de"],
    ".sys.comcast.net": ["resqmta-a2p-658780.sys.comcast.net"],
    ".cloudfilter.net": ["omta36.uswest2.a.cloudfilter.net", "omta001.cacentral1.a.cloudfilter.net"],
    ".amazon.com": ["smtp-fw-80009.amazon.com"],
    ".ppe-hosted.com": ["dispatch1-us1.ppe-hosted.com"],
    ".gpphosted.com": ["mx0e-00007b01.gpphosted.com"],
    ".iphmx.com": ["esa6.hc3370-68.iphmx.com", "esa3.hc1455-7.c3s2.iphmx.com"],
    ".antispameurope.com": ["mx-relay09-hz1.antispameurope.com"],
    ".mail-out.ovh.net": ["5.mo534.mail-out.ovh.net"],
    ".oracleemaildelivery.com": ["aib29gb123.yyz1.oracleemaildelivery.com"],
    ".zohomail360.com": ["sender4-g3-154.zohomail360.com"],
    ".web-hosting.com": ["premium238-5.web-hosting.com"],
}


def _shipped_entries() -> list[str]:
    entries = []
    for raw in SHIPPED.read_text().splitlines():
        words = raw.split()
        if words and not words[0].startswith("#"):
            entries.append(words[0])
    return entries


def test_every_shipped_name_entry_has_an_example() -> None:
    names = [e for e in _shipped_entries() if not e[0].isdigit() and ":" not in e]
    assert sorted(names) == sorted(SHIPPED_EXAMPLES)


@pytest.mark.parametrize("entry,name", [(e, n) for e, ns in SHIPPED_EXAMPLES.items() for n in ns])
def test_shipped_list_lets_flagged_senders_through(entry: str, name: str) -> None:
    shipped = AllowList.load(SHIPPED)
    assert match_rule(name) is not None, "bare S25R must flag the example"
    verdict = classify(name, "203.0.113.9", shipped)
    assert verdict.allowed_by == entry and not verdict.suspicious
    # a forged PTR (not forward-confirmed) gets no favour from the list
    forged = classify(name, "203.0.113.9", shipped, name_trusted=False, hints=False)
    assert forged.allowed_by is None and forged.suspicious


@pytest.mark.parametrize("name", ["mail-yw1-f170.evilgoogle.com", "a1-2.google.com.evil.example",
                                  "mail1-2.fakeyahoo.com", "p1-2.notamazonses.com"])
def test_shipped_list_does_not_cover_lookalikes(name: str) -> None:
    verdict = classify(name, "203.0.113.9", AllowList.load(SHIPPED), hints=False)
    assert verdict.allowed_by is None and verdict.suspicious


# --- never raises ------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(name=st.one_of(st.none(), st.text()), ip=st.one_of(st.none(), st.text()),
       extra=st.booleans(), trusted=st.booleans())
def test_classify_never_raises(name: str | None, ip: str | None, extra: bool,
                               trusted: bool) -> None:
    allow = AllowList.parse(ALLOW_TEXT)
    verdict = classify(name, ip, allow, extra=extra, name_trusted=trusted)
    assert verdict.rule is None or 0 <= verdict.rule <= 7
    assert isinstance(verdict.reason, str)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_raises_only_control_error(text: str) -> None:
    try:
        AllowList.parse(text)
    except ControlError:
        pass


# --- tarpitctl s25r ------------------------------------------------------------

def _ctl(args: list[str], control: Path | None = None, stdin: str | bytes | None = None,
         env_control: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "TARPIT_CONTROL"}
    if env_control is not None:
        env["TARPIT_CONTROL"] = str(env_control)
    argv = ["tarpitctl", "s25r"] + (["--control", str(control)] if control else []) + args
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run(argv, input=data, capture_output=True, env=env, timeout=60)


@pytest.fixture()
def control(tmp_path: Path) -> Path:
    (tmp_path / "s25r-allow").write_bytes(SHIPPED.read_bytes())
    return tmp_path


def test_cli_prints_one_line_per_name(control: Path) -> None:
    names = ["mail-yw1-f170.google.com", "p6041-ip02funabasi.chiba.ocn.ne.jp",
             "mail.example.com", "unknown"]
    proc = _ctl(names, control)
    assert proc.stdout.decode().splitlines() == [
        "mail-yw1-f170.google.com\tallow\trule=1",
        "p6041-ip02funabasi.chiba.ocn.ne.jp\tmatch\trule=1",
        "mail.example.com\tnomatch",
        "unknown\tmatch\trule=0",
    ]
    assert proc.returncode == 1 and proc.stderr == b""


def test_cli_exit_0_when_nothing_suspicious(control: Path) -> None:
    proc = _ctl(["mail.example.com", "mail-yw1-f170.google.com"], control)
    assert proc.returncode == 0


def test_cli_allow_without_rule_prints_dash(tmp_path: Path) -> None:
    (tmp_path / "s25r-allow").write_text("mx.partner.example\n")
    proc = _ctl(["mx.partner.example"], tmp_path)
    assert proc.stdout.decode() == "mx.partner.example\tallow\trule=-\n"
    assert proc.returncode == 0


def test_cli_no_allow_and_extra(control: Path) -> None:
    proc = _ctl(["--no-allow", "--no-hints", "mail-yw1-f170.google.com"], control)
    assert proc.stdout.decode() == "mail-yw1-f170.google.com\tmatch\trule=1\n"
    assert proc.returncode == 1
    proc = _ctl(["--no-allow", "mail-yw1-f170.google.com"], control)
    assert proc.stdout.decode() == "mail-yw1-f170.google.com\thint\trule=1\thint=mail\n"
    assert proc.returncode == 0
    assert _ctl(["abc.pool.isp.example"], control).stdout.decode() == \
        "abc.pool.isp.example\tmatch\trule=7\n", "rule 7 is on by default"
    (control / "tarpit.toml").write_text("s25r_extra = false\n")
    assert _ctl(["abc.pool.isp.example"], control).stdout.decode() == \
        "abc.pool.isp.example\tnomatch\n", "the site's tarpit.toml turns it off"
    assert _ctl(["--extra", "abc.pool.isp.example"], control).stdout.decode() == \
        "abc.pool.isp.example\tmatch\trule=7\n", "--extra turns it on whatever the configuration says"


def test_cli_stdin_with_empty_line_and_escaping(control: Path) -> None:
    proc = _ctl(["--stdin"], control, stdin=b"adsl9.example.com\r\n\nbad\x01name\tx\n\xff.example\n")
    assert proc.stdout.decode().splitlines() == [
        "adsl9.example.com\tmatch\trule=6",
        "\tmatch\trule=0",
        "bad?name?x\tnomatch",
        "?.example\tnomatch",
    ]


def test_cli_control_from_environment(tmp_path: Path) -> None:
    (tmp_path / "s25r-allow").write_text(".isp.example\n")
    proc = _ctl(["adsl9.isp.example"], env_control=tmp_path)
    assert proc.stdout.decode() == "adsl9.isp.example\tallow\trule=6\n"


def test_cli_missing_allow_list_means_none(tmp_path: Path) -> None:
    proc = _ctl(["pv50p00im-ztdg10021101.me.com"], tmp_path)
    assert proc.stdout.decode() == "pv50p00im-ztdg10021101.me.com\tmatch\trule=1\n"


def test_cli_corrupt_allow_list_exits_111(tmp_path: Path) -> None:
    path = tmp_path / "s25r-allow"
    path.write_text(".ok.example\n10.0.0.0/40\n")
    proc = _ctl(["mail.example.com"], tmp_path)
    assert proc.returncode == 111
    assert proc.stdout == b""
    assert proc.stderr.decode().startswith(f"tarpitctl: {path}:2: ")
    assert "Traceback" not in proc.stderr.decode()


def test_cli_explain_adds_indented_reasons(control: Path) -> None:
    proc = _ctl(["--explain", "smtp2-g21.free.fr", "mail-01-1.mymagenta.at",
                 "p6041-ip02funabasi.chiba.ocn.ne.jp"], control)
    lines = proc.stdout.decode().splitlines()
    assert [ln for ln in lines if not ln.startswith("  ")] == [
        "smtp2-g21.free.fr\tallow\trule=1",
        "mail-01-1.mymagenta.at\thint\trule=1\thint=mail",
        "p6041-ip02funabasi.chiba.ocn.ne.jp\tmatch\trule=1",
    ]
    assert lines[1].startswith(f"  decided by: allow-list entry .free.fr ({control / 's25r-allow'}:")
    assert '  decided by: mail-server hint "mail" in label "mail-01-1"' in lines[4]
    assert lines[-1] == '  rule 1: pattern ^[^.]*[0-9][^0-9.]+[0-9] matched "p6041-ip0"'
    assert proc.returncode == 1


@pytest.mark.parametrize("args", [[], ["--stdin", "x.example"], ["--bogus", "x"]])
def test_cli_usage_errors_exit_100(control: Path, args: list[str]) -> None:
    assert _ctl(args, control, stdin="").returncode == 100
