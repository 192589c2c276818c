"""libtarpit.serveargs: tcpserver's command line, bundled the way sgetopt bundles it."""

from __future__ import annotations

import pytest

from libtarpit.serveargs import LETTERS, USAGE, ServeArgs, UsageError, parse

TAIL = ["0", "25", "/var/qmail/bin/qmail-smtpd"]


def p(*words: str, env: dict[str, str] | None = None, long_options=()) -> ServeArgs:
    return parse(list(words), environ=env or {}, long_options=long_options)


def test_defaults_are_tcpservers():
    a = p(*TAIL)
    assert a == ServeArgs("0", 25, ("/var/qmail/bin/qmail-smtpd",))
    assert (a.concurrency, a.rules, a.verbosity, a.remote_host, a.paranoid, a.remote_info,
            a.local_host, a.uid, a.gid, a.backlog, a.banner, a.options) == (
        40, None, 1, True, False, True, None, None, None, 20, "", ())


def test_the_issues_run_line():
    a = p("-vRl0", "-hp", "-x", "/etc/tcp.smtp.cdb", "0", "25", "/var/qmail/bin/qmail-smtpd", "-x")
    assert (a.verbosity, a.remote_info, a.local_host, a.remote_host, a.paranoid, a.rules) == (
        2, False, "0", True, True, "/etc/tcp.smtp.cdb")
    assert a.program == ("/var/qmail/bin/qmail-smtpd", "-x")  # options end at the host


@pytest.mark.parametrize("words, field, expected", [
    (["-c", "100"], "concurrency", 100), (["-c100"], "concurrency", 100),
    (["-x", "r.cdb"], "rules", "r.cdb"), (["-xr.cdb"], "rules", "r.cdb"),
    (["-v"], "verbosity", 2), (["-q"], "verbosity", 0), (["-vQ"], "verbosity", 1),
    (["-H"], "remote_host", False), (["-Hh"], "remote_host", True),
    (["-p"], "paranoid", True), (["-pP"], "paranoid", False),
    (["-R"], "remote_info", False), (["-Rr"], "remote_info", True),
    (["-l", "mx.example"], "local_host", "mx.example"), (["-l0"], "local_host", "0"),
    (["-u", "1001"], "uid", 1001), (["-u0"], "uid", None), (["-g", "1002"], "gid", 1002),
    (["-b", "5"], "backlog", 5), (["-b0"], "backlog", 0), (["-t", "5"], "timeout", 5), (["-t0"], "timeout", 0),
    (["-B", "hello\r\n"], "banner", "hello\r\n"),
])
def test_every_letter(words, field, expected):
    assert getattr(p(*words, *TAIL), field) == expected


def test_every_accepted_letter_has_a_case():
    assert set(LETTERS) == set("cxBgubltvqQhHpPrRU")


def test_bundles_and_arguments_as_sgetopt_reads_them():
    a = p("-vRHl0c7", "-pu5", "-g", "6", *TAIL)
    assert (a.verbosity, a.remote_info, a.remote_host, a.local_host, a.paranoid, a.uid, a.gid) == (
        2, False, False, "0c7", True, 5, 6)  # an argument letter takes the rest of the word
    assert p("-x", "-v", *TAIL).rules == "-v"  # the next word, whatever it is


def test_later_letters_override_earlier():
    assert p("-v", "-q", *TAIL).verbosity == 0
    assert p("-c1", "-c2", *TAIL).concurrency == 2
    assert p("-pPp", *TAIL).paranoid is True


def test_U_reads_uid_and_gid_at_its_place():
    env = {"UID": "1001", "GID": "1002"}
    a = p("-U", *TAIL, env=env)
    assert (a.uid, a.gid) == (1001, 1002)
    assert p("-U", "-u7", *TAIL, env=env).uid == 7
    assert p("-u7", "-U", *TAIL, env=env).uid == 1001
    assert p("-u7", "-U", *TAIL, env={"GID": "3"}).uid == 7  # $UID unset: unchanged
    assert p("-U", *TAIL, env={}).uid is None
    with pytest.raises(UsageError, match=r"\$UID"):
        p("-U", *TAIL, env={"UID": "nobody"})


def test_double_dash_ends_options_and_lone_dash_is_the_host():
    with pytest.raises(UsageError, match="host '-'"):
        p("-v", "-", "25", "prog")
    a = p("-v", "--", "0", "25", "prog")
    assert (a.verbosity, a.host) == (2, "0")


def test_hosts():
    assert p("", "25", "prog").host == "0"
    assert p("0", "25", "prog").host == "0"
    assert p("127.0.0.1", "25", "prog").host == "127.0.0.1"
    assert p("::", "25", "prog").host == "::"
    assert p("[2001:DB8::1]", "25", "prog").host == "2001:db8::1"
    assert p("mx.example.com", "25", "prog").host == "mx.example.com"
    for bad in ("1.2.3", "256.1.1.1", "::g", "a b", "a..b", "x_y z", "a.-mx.example", "mx-.example"):
        with pytest.raises(UsageError, match="host"):
            p(bad, "25", "prog")


def test_ports():
    assert p("0", "0", "prog").port == 0
    assert p("0", "65535", "prog").port == 65535
    assert p("0", "smtp", "prog").port == 25
    for bad in ("65536", "no-such-service-here", "-1", "２５"):
        with pytest.raises(UsageError, match="port"):
            p("0", bad, "prog")


@pytest.mark.parametrize("words, message", [
    (["-c", "x"], "-c needs a decimal number"), (["-c10x"], "-c needs a decimal number"),
    (["-c", "0"], "-c 0: must be from 1"), (["-c", "-1"], "-c needs a decimal number"),
    (["-c", "-v"], "-c needs a decimal number"), (["-b", ""], "-b needs a decimal number"), (["-u", "root"], "-u needs a decimal number"),
    (["-u", str(2**32)], "-u 4294967296: must be from 0"), (["-x", ""], "-x needs a file name"),
    (["-Z"], "illegal option -- Z"), (["-vZ"], "illegal option -- Z"),
    (["-X"], "option -X is not supported"), (["-1"], "option -1 is not supported"),
    (["-d"], "option -d is not supported"), (["-D"], "option -D is not supported"),
    (["-o"], "option -o is not supported"), (["-O"], "option -O is not supported"),
    (["-t", "x"], "-t needs a decimal number"), (["-6"], "option -6 is not supported"),
    (["--daemon"], "unknown option --daemon"),
])
def test_errors(words, message):
    with pytest.raises(UsageError) as e:
        p(*words, *TAIL)
    assert message in str(e.value)


@pytest.mark.parametrize("words, missing", [([], "host"), (["0"], "port"), (["0", "25"], "program"),
                                            (["-v", "0", "25"], "program")])
def test_missing_operands(words, missing):
    for last in ("-c", "-vx"):
        with pytest.raises(UsageError, match=f"option requires an argument -- {last[-1]}"):
            p(last)
    with pytest.raises(UsageError, match=f"no {missing} given"):
        p(*words)
    with pytest.raises(UsageError, match="empty word"):
        p("0", "25", "")


def test_long_options_are_declared_by_the_caller():
    opts = ("daemon", "workers=")
    a = p("-v", "--workers=2", "--daemon", "-q", "--workers", "3", *TAIL, long_options=opts)
    assert a.options == (("workers", "2"), ("daemon", None), ("workers", "3"))
    assert a.verbosity == 0
    for words, message in ((["--daemon=1"], "takes no value"), (["--workers"], "requires an argument"),
                           (["--nope"], "unknown option --nope")):
        with pytest.raises(UsageError, match=message):
            p(*words, long_options=opts)


def test_value_is_immutable_and_typed_equal():
    a = p(*TAIL)
    with pytest.raises(AttributeError):
        a.concurrency = 1
    assert a != tuple(a)
    assert hash(a) == hash(p(*TAIL))
    assert USAGE.startswith("usage: tarpit-smtpd serve ")
