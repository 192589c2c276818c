"""libtarpit.envelope: the one spelling of each command that every backend reads the same way.

Tables give each backend's reading of odd spellings (from qmail-smtpd.c
`addrparse`/`commands`, exim's smtp_in.c `smtp_read_command` and parse.c
`parse_extract_address`, aiosmtpd's `_getaddr`); the property tests compare
with a small Python model of qmail-smtpd (below) and with aiosmtpd's own
parser: whenever we return an address, the backend reads that same address.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libtarpit.envelope import NO_ARG_VERBS, bdat_arg, helo_arg, mail_arg, no_arg, rcpt_arg, verb_split

# --- reference models of the backends -----------------------------------------


def qmail_split(line: bytes) -> tuple[bytes, bytes]:
    """qmail's commands.c: up to LF, one CR dropped, C string (NUL ends it), verb to the first SP."""
    line = line.split(b"\n", 1)[0]
    if line.endswith(b"\r"):
        line = line[:-1]
    line = line.split(b"\0", 1)[0]
    verb, _, arg = line.partition(b" ")
    return verb, arg.lstrip(b" ")


def qmail_addrparse(arg: str) -> str | None:
    """qmail-smtpd.c addrparse(): the address qmail queues for this MAIL/RCPT argument, None for 555."""
    arg = arg.split("\0", 1)[0]
    lt = arg.find("<")
    if lt >= 0:
        arg, terminator = arg[lt + 1:], ">"
    else:  # "partner should go read rfc 821"
        colon = arg.find(":")
        arg, terminator = (arg[colon + 1:] if colon >= 0 else ""), " "
        arg = arg.lstrip(" ")
    if arg.startswith("@"):  # source route: up to and including the first ':'
        colon = arg.find(":")
        arg = arg[colon + 1:] if colon >= 0 else ""
    out, esc, quoted = [], False, False
    for ch in arg:
        if esc:
            out.append(ch)
            esc = False
        elif not quoted and ch == terminator:
            break
        elif ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        else:
            out.append(ch)
    addr = "".join(out)
    return None if len(addr) + 1 > 900 else addr


_AIOSMTPD = []


def aiosmtpd_path(arg: str, keyword: str) -> str | None:
    """aiosmtpd's reading of a MAIL/RCPT argument: the address, or None when it refuses to parse one."""
    if not _AIOSMTPD:
        from aiosmtpd.smtp import SMTP

        class Handler:
            pass

        _AIOSMTPD.append(SMTP(Handler()))
    arg = arg.strip()
    if arg[: len(keyword)].upper() != keyword:
        return None
    address, _ = _AIOSMTPD[0]._getaddr(arg[len(keyword):].strip())
    return address or None


def exim_bdat(arg: str) -> tuple[int, bool] | None:
    """exim's BDAT: sscanf("%u %n") on glibc (strtoul, then truncated to 32 bits), LAST any case."""
    s = arg.strip(" \t\r\n\v\f")
    i = 0
    while i < len(s) and s[i] in " \t\n\v\f\r":
        i += 1
    sign = 1
    if i < len(s) and s[i] in "+-":
        sign = -1 if s[i] == "-" else 1
        i += 1
    j = i
    while j < len(s) and s[j] in "0123456789":
        j += 1
    if j == i:
        return None
    value = min(int(s[i:j]), 2**64 - 1)
    value = (value * sign) % 2**64 % 2**32
    rest = s[j:].lstrip(" \t\n\v\f\r")
    return value, rest.upper() == "LAST"


# --- tables -------------------------------------------------------------------

# (argument after "RCPT ", what rcpt_arg returns, why)
RCPT_CASES = [
    ("TO:<bob@example.com>", "bob@example.com", "canonical"),
    ("to:<Bob@Example.COM>", "Bob@Example.COM", "returned as sent; the caller folds case"),
    ("To: <bob@example.com>", "bob@example.com", "one SP after the colon: all three skip it"),
    ("TO:<bob@example.com> NOTIFY=NEVER ORCPT=rfc822;bob@example.com", "bob@example.com", "params"),
    ("TO:<bob@example.com>  ", "bob@example.com", "trailing SPs: exim and aiosmtpd strip, qmail stops at >"),
    ("TO:<@relay.example,@b.example:bob@example.com>", "bob@example.com", "source route: all three drop it"),
    ("TO:<Postmaster>", "Postmaster", "RFC 5321 4.1.1.3"),
    ("TO:<first.last+tag@sub.example.com>", "first.last+tag@sub.example.com", "dot-atom"),
    ("TO:<nosuchuser@example.org", None, "no >: qmail and aiosmtpd read it, exim refuses"),
    ("<nosuchuser@example.org>", None, "no TO:: qmail reads it"),
    ("TO:alice@example.org <nosuchuser@example.org>", None, "qmail reads the second, aiosmtpd the first"),
    ("TO:bob <nosuchuser@example.com>", None, "exim reads a phrase then the route-addr"),
    ("TO:bob@example.com", None, "no brackets: qmail stops at SP, exim reads a mailbox"),
    ("TO:<bob@example.com<nosuchuser@example.com>", None, "second <"),
    ("TO:<bob@example.com>x", None, "text glued to >"),
    ("TO:<bob@example.com> <nosuchuser@example.com>", None, "second path as a parameter"),
    ("TO:<bob@example.com>  NOTIFY=NEVER", None, "two SPs"),
    ("TO:  <bob@example.com>", None, "two SPs after the colon"),
    (" TO:<bob@example.com>", None, "SP before TO: (exim needs exactly 'rcpt to:')"),
    ("TO :<bob@example.com>", None, "SP before the colon"),
    ('TO:<"bob"@example.com>', None, "quotes: qmail and aiosmtpd drop them, exim keeps them"),
    ('TO:<"nosuch>user"@example.com>', None, "quoted >"),
    ("TO:<b\\ob@example.com>", None, "backslash: qmail queues bob"),
    ("TO:<bob(comment)@example.com>", None, "comment: exim and aiosmtpd drop it, qmail keeps it"),
    ("TO:<bob @example.com>", None, "SP inside"),
    ("TO:<>", None, "null recipient: qmail queues an empty address, aiosmtpd '<>'"),
    ("TO:<bob>", None, "unqualified"),
    ("TO:<@example.com:>", None, "route without an address"),
    ("TO:<@evil>:bob@example.com>", None, "qmail strips to the first ':' whatever comes before"),
    ("TO:<bob@[127.0.0.1]>", None, "domain literal: qmail rewrites it via localiphost"),
    ("TO:<bob@example.com.>", None, "trailing dot"),
    ("TO:<.bob@example.com>", None, "leading dot"),
    ("TO:<bob..x@example.com>", None, "empty word"),
    ("TO:<bob@-example.com>", None, "hyphen-led label"),
    ("TO:<bob@exam_ple.com>", None, "underscore in a host name"),
    ("TO:<bob@example.com> NOTIFY=<x@y>", None, "< in a parameter"),
    ("TO:<bob@example.com> X=(y)", None, "comment chars in a parameter"),
    ("TO:<bob@example.com> =x", None, "empty keyword"),
    ("TO:<bob\x00@example.com>", None, "NUL"),
    ("TO:<bob\r@example.com>", None, "CR"),
    ("TO:\t<bob@example.com>", None, "TAB"),
    ("TO:<b\xf6b@example.com>", None, "8-bit"),
    ("TO:<" + "b" * 65 + "@example.com>", None, "local part over 64"),
    ("", None, "empty"),
]

MAIL_CASES = [
    ("FROM:<alice@example.org>", "alice@example.org"),
    ("FROM:<>", ""),
    ("from: <> SIZE=100 BODY=8BITMIME", ""),
    ("FROM:<alice@example.org> SIZE=100", "alice@example.org"),
    ("FROM:<@r.example:alice@example.org>", "alice@example.org"),
    ("FROM:<alice@example.org", None),
    ("FROM:alice@example.org", None),
    ("<alice@example.org>", None),
    ("FROM:Alice <alice@example.org>", None),
    ("FROM:<@r.example:>", None),
    ("FROM:<alice>", None),
    ("FROM:<<>>", None),
    ("FROM:<> <alice@example.org>", None),
    ('FROM:<"a b"@example.org>', None),
]

# (line, verb_split result)
VERB_CASES = [
    (b"RCPT TO:<bob@example.com>\r\n", ("RCPT", "TO:<bob@example.com>")),
    (b"rcpt TO:<bob@example.com>\n", ("RCPT", "TO:<bob@example.com>")),
    (b"RSET", ("RSET", "")),
    (b"RSET \r\n", ("RSET", " "[1:])),
    (b"RSET x\r\n", ("RSET", "x")),
    (b"RSET \xff\r\n", ("RSET", "\xff")),
    (b"RCPT  TO:<bob@example.com>\r\n", ("RCPT", " TO:<bob@example.com>")),
    (b"RSET\r\r\n", None),       # qmail: verb "RSET\r" (502); exim, aiosmtpd: RSET
    (b"RS\rET\r\n", None),
    (b"RSET\x00\r\n", None),     # qmail: RSET; exim: 500
    (b"RCPT TO:<bob@example.com>\x00<x@example.com>\r\n", None),
    (b"RCPT\tTO:<bob@example.com>\r\n", None),
    (b"RSET\t\r\n", None),       # exim strips the TAB and resets; qmail, aiosmtpd: unknown verb
    (b"RSET\x0b\r\n", None),
    (b" RSET\r\n", None),
    (b"\r\n", None),
    (b"R5ET\r\n", None),
    (b"\xffRSET\r\n", None),
    (b"X" * 17 + b"\r\n", None),
]

BDAT_CASES = [
    ("100", (100, False)),
    ("100 LAST", (100, True)),
    ("100 last", (100, True)),
    ("0 LAST", (0, True)),
    ("0", None),                 # exim: 504 and then only RSET
    ("4294967296", None),        # exim: 0
    ("4294967297 LAST", None),   # exim: 1
    ("2147483648", None),        # exim: a negative int
    ("2147483647", (2147483647, False)),
    ("99999999999999999999", None),
    ("+5", None),
    ("-1", None),                # exim: 4294967295
    (" 5", None),
    ("5  LAST", None),
    ("5\tLAST", None),
    ("5 LASTX", None),
    ("5 LAST x", None),
    ("0x10", None),
    ("", None),
    ("\u00b2", None),            # a Unicode digit
]


@pytest.mark.parametrize("arg,expected,why", RCPT_CASES, ids=[c[2] for c in RCPT_CASES])
def test_rcpt_table(arg, expected, why):
    assert rcpt_arg(arg) == expected


@pytest.mark.parametrize("arg,expected", MAIL_CASES)
def test_mail_table(arg, expected):
    assert mail_arg(arg) == expected


@pytest.mark.parametrize("line,expected", VERB_CASES)
def test_verb_table(line, expected):
    assert verb_split(line) == expected


@pytest.mark.parametrize("arg,expected", BDAT_CASES)
def test_bdat_table(arg, expected):
    assert bdat_arg(arg, 2**40) == expected


def test_bdat_max_size():
    assert bdat_arg("1000", 1000) == (1000, False)
    assert bdat_arg("1001", 1000) is None


@pytest.mark.parametrize("arg,expected", [("", True), ("  ", True), ("x", False), (" x", False),
                                          ("\xff", False), ("\t", False)])
def test_no_arg(arg, expected):
    assert no_arg(arg) is expected
    assert NO_ARG_VERBS == {"RSET", "DATA", "QUIT", "STARTTLS"}


@pytest.mark.parametrize("arg,expected", [
    ("mx.example.com", "mx.example.com"), ("localhost ", "localhost"), ("[192.0.2.1]", "[192.0.2.1]"),
    ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"), ("", None), ("mx example", None), ("mx_1.example", None),
    ("[192.0.2.256]", None), ("[2001:db8::1]", None), ("[IPv6:192.0.2.1]", None), ("exa\xf6mple", None),
])
def test_helo(arg, expected):
    assert helo_arg(arg) == expected


def test_table_agrees_with_the_qmail_model():
    """Every accepted table row is what qmail queues."""
    for arg, expected, _ in RCPT_CASES:
        if expected is not None:
            assert qmail_addrparse(arg) == expected, arg
    for arg, expected in MAIL_CASES:
        if expected is not None:
            assert qmail_addrparse(arg) == expected, arg


def test_the_reported_bypasses_are_read_by_qmail():
    """The model reproduces issue 10: qmail queues nosuchuser where the old wrapper saw none or alice."""
    assert qmail_addrparse("TO:<nosuchuser@example.org") == "nosuchuser@example.org"
    assert qmail_addrparse("<nosuchuser@example.org>") == "nosuchuser@example.org"
    assert qmail_addrparse("TO:alice@example.org <nosuchuser@example.org>") == "nosuchuser@example.org"
    assert qmail_addrparse("TO:bob@example.com") == "bob@example.com"


# --- properties ---------------------------------------------------------------

TOKENS = ["TO:", "FROM:", "to:", "<", ">", "<>", "@", ":", ",", ".", " ", "  ", '"', "\\", "(", ")", "\t",
          "\r", "\0", "bob", "Postmaster", "example.com", "nosuch", "x", "-", "_", "[1.2.3.4]", "=",
          "NOTIFY=NEVER", "SIZE=10", "\xf6", "'", "+", ";", "%", "!"]
args = st.lists(st.sampled_from(TOKENS), max_size=14).map("".join)
shaped = st.tuples(st.sampled_from(["TO:", "to:", "TO: ", "FROM:", "FROM: "]), st.sampled_from(["<", ""]),
                   st.sampled_from(["", "@a.example:", "@a.example,@b:", "@x>:"]), args,
                   st.sampled_from([">", "", "> ", ">>"]), args).map("".join)
VALID = ["TO:<bob@example.com>", "TO: <@r.example:bob@example.com> NOTIFY=NEVER", "TO:<Postmaster>",
         "FROM:<>", "FROM:<alice@example.org> SIZE=10", "FROM: <@a,@b:x.y@example.org>"]


@st.composite
def mutated(draw):
    """A valid argument with a few tokens inserted or characters deleted: near misses."""
    text = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
        else:
            text = text[:at] + text[at + 1:]
    return text


near = st.one_of(mutated(), mutated(), mutated(), args, shaped)


@settings(max_examples=600, deadline=None)
@given(near)
def test_rcpt_returns_what_qmail_and_aiosmtpd_read(arg):
    got = rcpt_arg(arg)
    if got is None:
        return
    assert qmail_addrparse(arg.lstrip(" ")) == got
    assert aiosmtpd_path(arg, "TO:") == got


@settings(max_examples=400, deadline=None)
@given(near)
def test_mail_returns_what_qmail_and_aiosmtpd_read(arg):
    got = mail_arg(arg)
    if got is None:
        return
    assert qmail_addrparse(arg.lstrip(" ")) == got
    if got:
        assert aiosmtpd_path(arg, "FROM:") == got


def test_valid_paths_survive():
    """Generated canonical paths come back unchanged, as sent."""
    @settings(max_examples=150, deadline=None)
    @given(st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[A-Za-z0-9+_-]{1,5}){0,2}", fullmatch=True),
           st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z]{2,6}){1,2}", fullmatch=True))
    def check(local, domain):
        addr = f"{local}@{domain}"
        assert rcpt_arg(f"TO:<{addr}>") == addr
        assert mail_arg(f"FROM:<{addr}> SIZE=1") == addr
        assert qmail_addrparse(f"TO:<{addr}>") == addr
        assert aiosmtpd_path(f"TO:<{addr}>", "TO:") == addr

    check()


LINE_TOKENS = [b"RSET", b"rset", b"RCPT", b"DATA", b"QUIT", b"HELO", b" ", b"  ", b"\t", b"\r", b"\x00",
               b"\x0b", b"\xff", b"TO:<bob@example.com>", b"x", b"5"]
lines = st.tuples(st.lists(st.sampled_from(LINE_TOKENS), max_size=8).map(b"".join),
                  st.sampled_from([b"\r\n", b"\n", b"", b"\r\r\n"])).map(b"".join)
EXIM_ONE_WORD = {"RSET": False, "HELO": True, "EHLO": True, "DATA": False, "BDAT": True, "QUIT": False,
                 "NOOP": True, "VRFY": True, "EXPN": True, "HELP": True, "STARTTLS": False}


@settings(max_examples=600, deadline=None)
@given(lines)
def test_verb_split_agrees_with_every_backend(line):
    got = verb_split(line)
    if got is None:
        return
    verb, arg = got
    # qmail
    q_verb, q_arg = qmail_split(line)
    assert q_verb.upper().decode() == verb and q_arg.decode("latin-1") == arg.lstrip(" ")
    # aiosmtpd
    a_line = line.rstrip(b"\r\n")
    a_verb, _, a_arg = a_line.partition(b" ")
    assert a_verb.upper().decode() == verb and a_arg.strip().decode("latin-1") == arg.strip(" ")
    # exim: trailing white space dropped, the name then SP or end
    e_line = line.rstrip(b" \t\r\n\v\f").decode("latin-1")
    if verb in EXIM_ONE_WORD:
        name = verb.lower()
        assert e_line[: len(name)].lower() == name and e_line[len(name): len(name) + 1] in ("", " ")
        e_arg = e_line[len(name):].lstrip(" ")
        if verb in NO_ARG_VERBS:  # exim gives 501 exactly when no_arg says there is one
            assert (e_arg == "") == no_arg(arg)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789 +-LASTlast\t", max_size=14))
def test_bdat_agrees_with_exim(arg):
    got = bdat_arg(arg, 2**40)
    if got is None:
        return
    assert exim_bdat(arg) == got
    assert got[0] < 2**31
