"""libtarpit.tcprules against CDB files made by the real tcprules, and against real tcpserver -x."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import free_port, need
from libtarpit import tcprules
from libtarpit.errors import ControlError
from libtarpit.tcprules import Rule, apply, keys, lookup, parse_value

RULES = """\
# exact addresses, prefixes, names, the default
127.0.0.2:allow,RELAYCLIENT="",GREETING="x y"
127.0.0.3:deny
127.0.0.4:deny,WHY="no"
127.0.0.5:allow,TCPLOCALHOST="mx.example",EQ=/a=b/,SAME="1",SAME="2"
127.0.0.:allow,PREFIX3="yes"
127.0.:allow,PREFIX2="yes"
10.1.2.3:allow,FIRST="1"
10.1.2.3:allow,FIRST="2"
10.1.2.7-9:allow,RANGE="1"
=mail.example.com:allow,NAME="exact"
=.example.com:allow,NAME="suffix"
=.com:allow,NAME="tld"
=:allow,NAME="any"
info@10.9.9.9:allow,INFO="ip"
info@=h.example.net:allow,INFO="host"
:allow,DEFAULT="1"
"""


def build(directory, text: str, name: str = "rules.cdb") -> str:
    """Compile `text` with the real tcprules; return the CDB's path."""
    need("tcprules")
    path = os.path.join(directory, name)
    subprocess.run(["tcprules", path, path + ".tmp"], input=text.encode(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return path


@pytest.fixture
def cdb(tmp_path):
    return build(tmp_path, RULES)


def test_keys_in_rules_c_order():
    assert keys("1.2.3.4", "a.b.c", "joe") == [
        "joe@1.2.3.4", "joe@=a.b.c", "1.2.3.4", "=a.b.c", "1.2.3.", "1.2.", "1.",
        "=.b.c", "=.c", "=", ""]
    assert keys("1.2.3.4") == ["1.2.3.4", "1.2.3.", "1.2.", "1.", ""]
    assert keys("1.2.3.4", info="joe") == ["joe@1.2.3.4", "1.2.3.4", "1.2.3.", "1.2.", "1.", ""]


def test_keys_ipv6_cut_at_colons_and_mapped_ipv4():
    assert keys("2001:db8::1") == ["2001:db8::1", "2001:db8::", "2001:db8:", "2001:", ""]
    assert keys("::ffff:10.0.0.1") == keys("10.0.0.1")


def test_exact_address_with_variables(cdb):
    assert lookup(cdb, "127.0.0.2") == Rule("allow", "127.0.0.2", (("RELAYCLIENT", ""), ("GREETING", "x y")))


def test_deny_and_deny_with_variables(cdb):
    assert lookup(cdb, "127.0.0.3") == Rule("deny", "127.0.0.3", ())
    assert lookup(cdb, "127.0.0.4") == Rule("deny", "127.0.0.4", (("WHY", "no"),))


def test_any_quote_character_first_equals_splits_and_repeats_kept_in_order(cdb):
    rule = lookup(cdb, "127.0.0.5")
    assert rule.env == (("TCPLOCALHOST", "mx.example"), ("EQ", "a=b"), ("SAME", "1"), ("SAME", "2"))
    assert apply({}, rule)["SAME"] == "2"


def test_longest_prefix_first_then_shorter(cdb):
    assert lookup(cdb, "127.0.0.9") == Rule("allow", "127.0.0.", (("PREFIX3", "yes"),))
    assert lookup(cdb, "127.0.1.9") == Rule("allow", "127.0.", (("PREFIX2", "yes"),))


def test_first_of_duplicate_lines_wins_and_ranges_are_expanded_by_tcprules(cdb):
    assert lookup(cdb, "10.1.2.3").env == (("FIRST", "1"),)
    assert [lookup(cdb, f"10.1.2.{n}").env for n in (7, 8, 9)] == [(("RANGE", "1"),)] * 3
    assert lookup(cdb, "10.1.2.10").key == ""


def test_names_exact_then_suffixes_then_any_name(cdb):
    assert lookup(cdb, "192.0.2.1", "mail.example.com").env == (("NAME", "exact"),)
    assert lookup(cdb, "192.0.2.1", "x.mail.example.com").env == (("NAME", "suffix"),)
    assert lookup(cdb, "192.0.2.1", "foo.com").env == (("NAME", "tld"),)
    assert lookup(cdb, "192.0.2.1", "localhost").key == "="
    assert lookup(cdb, "192.0.2.1").key == ""


def test_exact_name_beats_prefix_but_prefix_beats_suffix(cdb):
    # rules.c: ip, =host, ip prefixes, =.suffix: not "every address form before any name"
    assert lookup(cdb, "127.0.0.9", "mail.example.com").key == "=mail.example.com"
    assert lookup(cdb, "127.0.0.9", "x.example.com").key == "127.0.0."
    assert lookup(cdb, "127.0.0.2", "mail.example.com").key == "127.0.0.2"


def test_remote_info_forms_only_when_info_known(cdb):
    assert lookup(cdb, "10.9.9.9", info="info").env == (("INFO", "ip"),)
    assert lookup(cdb, "10.9.9.8", "h.example.net", "info").env == (("INFO", "host"),)
    assert lookup(cdb, "10.9.9.9").key == ""
    assert lookup(cdb, "10.9.9.9", info="other").key == ""


def test_default_and_no_rule_at_all(cdb, tmp_path):
    assert lookup(cdb, "192.0.2.1") == Rule("allow", "", (("DEFAULT", "1"),))
    bare = build(tmp_path, "127.0.0.3:deny\n", "bare.cdb")
    assert lookup(bare, "192.0.2.1") is None
    assert apply({"A": "1"}, None) == {"A": "1"}


def test_tcprules_cannot_unset_a_variable_nor_write_ipv6_keys(tmp_path):
    for line in ("1.2.3.4:allow,FOO\n", "1.2.3.4:allow,-FOO\n", "::1:allow\n", "2001:db8::1:allow\n"):
        with pytest.raises(subprocess.CalledProcessError) as e:
            build(tmp_path, line, "bad.cdb")
        assert b"unable to parse this line" in e.value.stderr


def test_ipv6_keys_from_another_writer(tmp_path):
    # Debian's tcprules writes no IPv6 key; a CDB with them (fefe's patch) is read at ':' cuts.
    import cdblib

    path = tmp_path / "v6.cdb"
    with open(path, "wb") as f:
        w = cdblib.Writer(f)
        w.put(b"2001:db8:", b"+NET=doc\0")
        w.put(b"10.0.0.1", b"D\0")
        w.finalize()
    assert lookup(str(path), "2001:db8::25") == Rule("allow", "2001:db8:", (("NET", "doc"),))
    assert lookup(str(path), "2001:db9::25") is None
    assert lookup(str(path), "::ffff:10.0.0.1").action == "deny"


def test_parse_value_reads_records_as_found_does():
    assert parse_value(b"") == ("allow", ())
    assert parse_value(b"D\0") == ("deny", ())
    assert parse_value(b"+A=1\0Dx\0+B\0+=v\0\0?x\0+C=2") == ("deny", (("A", "1"),))
    assert parse_value(b"+N=\xff\0") == ("allow", (("N", "\udcff"),))


def test_apply_sets_in_order_and_unsets_none():
    env = {"KEEP": "1", "TCPREMOTEINFO": "x", "TCPLOCALHOST": "0"}
    rule = Rule("allow", "", (("TCPLOCALHOST", "mx"), ("TCPREMOTEINFO", None), ("NEW", "v")))
    assert apply(env, rule) == {"KEEP": "1", "TCPLOCALHOST": "mx", "NEW": "v"}
    assert env == {"KEEP": "1", "TCPREMOTEINFO": "x", "TCPLOCALHOST": "0"}


def test_reread_when_the_file_changes_and_not_before(tmp_path, monkeypatch):
    path = build(tmp_path, ":allow,V=\"1\"\n")
    assert lookup(path, "1.2.3.4").env == (("V", "1"),)
    opened = []
    real_open = os.open
    monkeypatch.setattr(tcprules.os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert lookup(path, "1.2.3.4").env == (("V", "1"),)
    assert path not in opened
    build(tmp_path, ":allow,V=\"2\"\n")  # tcprules renames a new file over the old
    assert lookup(path, "1.2.3.4").env == (("V", "2"),)
    assert opened.count(path) == 1


@pytest.mark.parametrize("damage", ["missing", "directory", "empty", "short", "table", "record"])
def test_unreadable_or_corrupt_file_is_a_control_error(tmp_path, damage):
    path = build(tmp_path, "1.2.3.4:allow,V=\"1\"\n:deny\n")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if damage == "missing":
        os.unlink(path)
    elif damage == "directory":
        os.unlink(path)
        os.mkdir(path)
    elif damage == "empty":
        data = b""
    elif damage == "short":
        data = data[:2047]
    else:
        h = tcprules._hash(b"1.2.3.4")
        if damage == "table":  # the key's hash table points past the end
            data[(h & 0xFF) * 8:(h & 0xFF) * 8 + 4] = (len(data) + 100).to_bytes(4, "little")
        else:  # the record's data length runs past the end
            data[2048 + 4:2048 + 8] = (1 << 20).to_bytes(4, "little")
    if damage not in ("missing", "directory"):
        with open(path, "wb") as f:
            f.write(data)
    with pytest.raises(ControlError) as e:
        lookup(path, "1.2.3.4")
    assert e.value.path == path


# -- against the real tcpserver ------------------------------------------------------

@pytest.fixture
def tcpserver_env(tmp_path):
    """Start `tcpserver -vRHl0 -x CDB 127.0.0.1 PORT env`; yield (start, log)."""
    need("tcpserver")
    procs = []
    log = tmp_path / "tcpserver.log"

    def start(cdb: str) -> int:
        port = free_port()
        with open(log, "ab") as out:  # the child keeps its own copy
            proc = subprocess.Popen(["tcpserver", "-vRHl0", "-x", cdb, "127.0.0.1", str(port), "env"],
                                    stdout=out, stderr=out, env={"PATH": os.environ["PATH"], "KEEP": "1"},
                                    start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while b"status: 0/" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        return port

    yield start, log
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def run_env(port: int, src: str) -> tuple[bytes, int]:
    """Connect from `src`; return (everything the server sent, our source port)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0)) as s:
        srcport = s.getsockname()[1]
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out, srcport


def test_env_printed_under_tcpserver_is_what_apply_predicts(cdb, tcpserver_env):
    start, log = tcpserver_env
    port = start(cdb)
    for src in ("127.0.0.2", "127.0.0.5", "127.0.0.9", "127.0.1.9", "127.0.0.3", "127.0.0.4"):
        out, srcport = run_env(port, src)
        rule = lookup(cdb, src)
        if rule.action == "deny":
            assert out == b"", src
            continue
        base = {"PATH": os.environ["PATH"], "KEEP": "1", "PROTO": "TCP",
                "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": str(port), "TCPLOCALHOST": "0",
                "TCPREMOTEIP": src, "TCPREMOTEPORT": str(srcport)}
        got = dict(line.split("=", 1) for line in out.decode().splitlines())
        assert got == apply(base, rule), src
    text = log.read_text()
    assert "deny" in text and ":127.0.0.3::" in text and ":127.0.0.4::" in text


def test_tcpserver_drops_the_connection_when_rules_cannot_be_read(tmp_path, tcpserver_env):
    start, log = tcpserver_env
    missing = str(tmp_path / "missing.cdb")
    port = start(missing)
    out, _ = run_env(port, "127.0.0.2")
    assert out == b""
    deadline = time.monotonic() + 10
    while "unable to read" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    assert f"dropping connection, unable to read {missing}" in log.read_text()
    with pytest.raises(ControlError):
        lookup(missing, "127.0.0.2")
