"""DNSWL (TARPIT_DNSWL): the query name, the meaning of answers, and the wrapper asking a real dnsmasq.

dnsmasq (Debian package dnsmasq-base) serves the zone list.dnswl.test the way list.dnswl.org
answers (127.0.CATEGORY.TRUST), and logs every query it gets (--log-queries), so a test can
show that a client was, or was not, asked about:
  127.0.0.2, ::ffff:127.0.0.2  -> 127.0.9.2    listed, trust level 2 (and RFC 5782's test point)
  127.0.0.3                    -> 127.0.0.255  dnswl.org's "query refused": must not trust
  127.0.0.4                    -> 10.0.0.1     an answer outside 127/8: must not trust
  127.0.0.5                    -> 127.0.9.0    listed at level 0 ("none"), below the default minimum
  127.0.0.6                    -> no record    not listed (NXDOMAIN)
  127.0.0.7, 127.0.0.8         -> 127.0.9.3    listed, for the "never asked" tests
  2001:db8::25                 -> 127.0.5.3    IPv6, by reversed nibbles
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest

from conftest import Dnsmasq, running_dnsmasq
from libtarpit import dnswl
from libtarpit.config import ConfigError, load_config

ZONE = "list.dnswl.test"
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
V6 = "2001:db8::25"


def v6_name(ip: str) -> str:
    import ipaddress

    return ".".join(reversed(ipaddress.IPv6Address(ip).exploded.replace(":", "")))


LISTING = {"127.0.0.2": "127.0.9.2", "127.0.0.3": "127.0.0.255", "127.0.0.4": "10.0.0.1",
           "127.0.0.5": "127.0.9.0", "127.0.0.7": "127.0.9.3", "127.0.0.8": "127.0.9.3"}
RECORDS = [f"--host-record={'.'.join(reversed(ip.split('.')))}.{ZONE},{answer}" for ip, answer in LISTING.items()]
RECORDS.append(f"--host-record={v6_name(V6)}.{ZONE},127.0.5.3")
LOCAL_ZONES = ["test"]


@pytest.fixture(scope="module")
def zone_server(tmp_path_factory) -> Iterator[Dnsmasq]:
    log = tmp_path_factory.mktemp("dnsmasq") / "queries.log"
    with running_dnsmasq(RECORDS, LOCAL_ZONES, log) as server:
        yield server


@pytest.fixture
def silent_udp() -> Iterator[int]:
    """A bound UDP port on 127.0.0.1 that reads nothing and never answers: a dead nameserver."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def servfail_udp() -> Iterator[int]:
    """A UDP nameserver on 127.0.0.1 that answers every query with SERVFAIL (dnsmasq cannot be made to)."""
    stop = threading.Event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(dns.rcode.SERVFAIL)
            sock.sendto(reply.to_wire(), peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join(timeout=5)
    sock.close()


def ask(server: Dnsmasq, ip: str, zone: str = ZONE) -> dnswl.Result:
    return dnswl.lookup(ip, zone, 5.0, nameservers=["127.0.0.1"], port=server.port)


# --- the pure part: names and the meaning of answers -------------------------------------

@pytest.mark.parametrize("ip, name", [
    ("192.0.2.25", "25.2.0.192.list.dnswl.org."),
    ("::ffff:192.0.2.25", "25.2.0.192.list.dnswl.org."),  # a dual-stack socket's IPv4 client
    ("2001:db8::25", "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.list.dnswl.org."),
    ("2001:DB8:0:0::25", "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.list.dnswl.org."),
])
def test_query_name_is_the_dnsbl_one(ip, name):
    assert dnswl.query_name(ip, "List.DNSWL.org.") == name


@pytest.mark.parametrize("bad", ["", "mail.example.org", "192.0.2.256", "1.2.3"])
def test_query_name_refuses_what_is_no_address(bad):
    with pytest.raises(ValueError):
        dnswl.query_name(bad, "list.dnswl.org")


@pytest.mark.parametrize("bad", [".", "list..dnswl.org", ".list.dnswl.org", "list dnswl.org",
                                 "list.dnswl.org/", "x" * 64 + ".org", ("a" * 60 + ".") * 4 + "org"])
def test_a_zone_that_is_no_dns_name_is_a_configuration_error(bad):
    with pytest.raises(ValueError):
        dnswl.parse_zone(bad)
    with pytest.raises(ConfigError, match="dnswl_zone"):
        load_config({"TARPIT_DNSWL": bad})
    with pytest.raises(ConfigError, match="dnswl_zone"):
        load_config({}, f'dnswl_zone = "{bad}"\n')


def test_configuration_knobs_and_their_defaults():
    off = load_config({})
    assert (off.dnswl_zone, off.dnswl_min_level, off.dnswl_timeout, off.dnswl_server) == ("", 1, 2.0, "")
    on = load_config({"TARPIT_DNSWL": "List.DNSWL.org.", "TARPIT_DNSWL_MIN_LEVEL": "2",
                      "TARPIT_DNSWL_TIMEOUT": "0.5", "TARPIT_DNSWL_SERVER": "127.0.0.1:5353"})
    assert (on.dnswl_zone, on.dnswl_min_level, on.dnswl_timeout, on.dnswl_server) == \
        ("list.dnswl.org", 2, 0.5, "127.0.0.1:5353")
    toml = load_config({}, 'dnswl_zone = "list.dnswl.org"\ndnswl_min_level = 0\n')
    assert (toml.dnswl_zone, toml.dnswl_min_level) == ("list.dnswl.org", 0)


@pytest.mark.parametrize("addresses, expected", [
    ([], dnswl.Result()),
    (["127.0.9.2"], dnswl.Result("127.0.9.2", 2)),
    (["127.0.5.0", "127.0.9.3"], dnswl.Result("127.0.9.3", 3)),    # the best listing counts
    (["127.0.0.255"], dnswl.Result("127.0.0.255", None, "blocked")),  # dnswl.org: query refused
    (["127.0.9.2", "127.0.0.255"], dnswl.Result("127.0.0.255", None, "blocked")),
    (["127.255.255.254"], dnswl.Result("127.255.255.254", None, "blocked")),  # Spamhaus-style refusal
    (["10.0.0.1"], dnswl.Result("10.0.0.1", None, "blocked")),   # a resolver rewriting NXDOMAIN
    (["::1"], dnswl.Result("::1", None, "blocked")),
])
def test_the_meaning_of_answers(addresses, expected):
    assert dnswl.judge(addresses) == expected


@pytest.mark.parametrize("result, min_level, trusted", [
    (dnswl.Result("127.0.9.2", 2), 1, True),
    (dnswl.Result("127.0.9.2", 2), 2, True),
    (dnswl.Result("127.0.9.2", 2), 3, False),
    (dnswl.Result("127.0.9.0", 0), 1, False),
    (dnswl.Result("127.0.9.0", 0), 0, True),
    (dnswl.Result("127.0.0.255", None, "blocked"), 0, False),
    (dnswl.Result(error="timeout"), 0, False),
    (dnswl.Result(), 0, False),
])
def test_trust_needs_a_listing_at_the_minimum_level(result, min_level, trusted):
    assert dnswl.trusts(result, min_level) is trusted


def test_importing_the_module_loads_no_dns_library():
    code = ("import sys, libtarpit.dnswl; from libtarpit.config import load_config; "
            "load_config({'TARPIT_DNSWL': 'list.dnswl.org'}); "
            "print(sorted(m for m in ('dns', 'ipaddress', 'typing', 're') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]", "validating the zone must not cost a connection dnspython, re or typing"


# --- the query, against dnsmasq ------------------------------------------------------------

def test_a_listed_address_comes_back_with_its_level(zone_server):
    assert ask(zone_server, "127.0.0.2") == dnswl.Result("127.0.9.2", 2)
    assert ask(zone_server, "::ffff:127.0.0.2") == dnswl.Result("127.0.9.2", 2)


def test_an_ipv6_address_is_asked_by_reversed_nibbles(zone_server):
    assert ask(zone_server, V6) == dnswl.Result("127.0.5.3", 3)
    assert f"{v6_name(V6)}.{ZONE}" in zone_server.queries()


def test_refusals_are_blocked_not_listed(zone_server):
    assert ask(zone_server, "127.0.0.3") == dnswl.Result("127.0.0.255", None, "blocked")
    assert ask(zone_server, "127.0.0.4") == dnswl.Result("10.0.0.1", None, "blocked")


def test_an_address_the_zone_does_not_hold_is_not_listed(zone_server):
    assert ask(zone_server, "127.0.0.6") == dnswl.Result()
    assert ask(zone_server, "2001:db8::99") == dnswl.Result()


def test_a_zone_the_server_refuses_is_an_error(zone_server):
    assert ask(zone_server, "127.0.0.2", "list.dnswl.example") == dnswl.Result(error="refused")


def test_a_dead_nameserver_is_a_timeout_within_the_limit(silent_udp):
    start = time.monotonic()
    assert dnswl.lookup("127.0.0.2", ZONE, 0.5, nameservers=["127.0.0.1"], port=silent_udp) == \
        dnswl.Result(error="timeout")
    assert time.monotonic() - start < 0.5 + 3.0


def test_servfail_is_not_listed_with_its_error(servfail_udp):
    assert dnswl.lookup("127.0.0.2", ZONE, 5.0, nameservers=["127.0.0.1"], port=servfail_udp) == \
        dnswl.Result(error="servfail")


def test_the_asyncio_lookup_gives_the_same_results(zone_server, silent_udp, servfail_udp):
    import asyncio

    async def both() -> list[dnswl.Result]:
        at = {"nameservers": ["127.0.0.1"]}
        return list(await asyncio.gather(
            dnswl.lookup_async("127.0.0.2", ZONE, 5.0, port=zone_server.port, **at),
            dnswl.lookup_async(V6, ZONE, 5.0, port=zone_server.port, **at),
            dnswl.lookup_async("127.0.0.3", ZONE, 5.0, port=zone_server.port, **at),
            dnswl.lookup_async("127.0.0.6", ZONE, 5.0, port=zone_server.port, **at),
            dnswl.lookup_async("127.0.0.2", ZONE, 0.5, port=silent_udp, **at),
            dnswl.lookup_async("127.0.0.2", ZONE, 5.0, port=servfail_udp, **at),
            dnswl.lookup_for_async(load_config({"TARPIT_DNSWL": ZONE, "TARPIT_DNSWL_SERVER":
                                                f"127.0.0.1:{zone_server.port}"}), "127.0.0.5")))

    assert asyncio.run(both()) == [
        dnswl.Result("127.0.9.2", 2), dnswl.Result("127.0.5.3", 3), dnswl.Result("127.0.0.255", None, "blocked"),
        dnswl.Result(), dnswl.Result(error="timeout"), dnswl.Result(error="servfail"), dnswl.Result("127.0.9.0", 0)]


def test_lookup_for_uses_the_configured_zone_and_server(zone_server):
    cfg = load_config({"TARPIT_DNSWL": ZONE, "TARPIT_DNSWL_SERVER": f"127.0.0.1:{zone_server.port}"})
    assert dnswl.lookup_for(cfg, "127.0.0.2") == dnswl.Result("127.0.9.2", 2)


# --- the wrapper under tcpserver -----------------------------------------------------------

RULES = "\n".join(f'127.0.0.{n}:allow,TCPREMOTEHOST="{DYNAMIC}"' for n in (2, 3, 4, 5, 6, 8)) + \
    '\n127.0.0.7:allow,TCPREMOTEHOST="mail.example.com"'
MESSAGE = b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: dnswl\r\n\r\nbody\r\n"


@pytest.fixture
def toml(tmp_path) -> str:
    """A tarpit.toml with a 1 s tarpit for suspicious clients only (TARPIT="1" would hold every class)."""
    path = tmp_path / "tarpit.toml"
    path.write_text('[suspicious]\ntarpit = 1\ngreylist = "off"\n')
    return str(path)


def wrapper_env(zone_server: Dnsmasq | None, toml: str, **more: str) -> dict[str, str]:
    env = {"TARPIT_CONFIG": toml, **more}
    if zone_server is not None:
        env.update(TARPIT_DNSWL=ZONE, TARPIT_DNSWL_SERVER=f"127.0.0.1:{zone_server.port}")
    return env


def deliver(server, src: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(src, 0), timeout=30) as s:
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
    server.wait_log(rf"ip={re.escape(src)} .*event=(exec|end)")


def lines_for(server, ip: str) -> list[dict[str, str]]:
    return [e for e in server.events() if e["ip"] == ip]


@pytest.mark.parametrize("listener", [False, True], ids=["wrapper", "serve"])
def test_a_listed_suspicious_client_is_trusted_and_not_tarpitted(zone_server, tarpit_server, toml, listener):
    server = tarpit_server(RULES, env=wrapper_env(zone_server, toml), listener=listener)
    deliver(server, "127.0.0.2")
    lines = lines_for(server, "127.0.0.2")
    assert [(e["event"], e["class"]) for e in lines] == [("dnswl", "trusted"), ("connect", "trusted"),
                                                        ("exec", "trusted")]
    assert (lines[0]["answer"], lines[0]["level"], lines[0]["rule"]) == ("127.0.9.2", "2", "1")
    assert server.messages() == [MESSAGE]


@pytest.mark.parametrize("listener", [False, True], ids=["wrapper", "serve"])
@pytest.mark.parametrize("src, detail", [("127.0.0.3", "blocked 127.0.0.255"), ("127.0.0.4", "blocked 10.0.0.1")])
def test_a_refused_query_trusts_nobody(zone_server, tarpit_server, toml, src, detail, listener):
    server = tarpit_server(RULES, env=wrapper_env(zone_server, toml), listener=listener)
    deliver(server, src)
    lines = lines_for(server, src)
    assert lines[0]["event"] == "error" and (lines[0]["what"], lines[0]["detail"]) == ("dnswl", detail)
    assert {e["class"] for e in lines} == {"suspicious"}
    assert [e["event"] for e in lines if e["event"].startswith("tarpit")] == ["tarpit_start", "tarpit_done"]


def test_a_listing_below_the_minimum_level_is_logged_and_changes_nothing(zone_server, tarpit_server, toml):
    server = tarpit_server(RULES, env=wrapper_env(zone_server, toml))
    deliver(server, "127.0.0.5")
    lines = lines_for(server, "127.0.0.5")
    assert (lines[0]["event"], lines[0]["answer"], lines[0]["level"]) == ("dnswl", "127.0.9.0", "0")
    assert "tarpit_start" in [e["event"] for e in lines] and lines[1]["class"] == "suspicious"
    lowered = tarpit_server(RULES, env=wrapper_env(zone_server, toml, TARPIT_DNSWL_MIN_LEVEL="0"))
    deliver(lowered, "127.0.0.5")
    assert lowered.events("connect")[0]["class"] == "trusted" and lowered.events("exec")


def test_not_listed_costs_one_query_and_no_line(zone_server, tarpit_server, toml):
    server = tarpit_server(RULES, env=wrapper_env(zone_server, toml))
    deliver(server, "127.0.0.6")
    assert f"6.0.0.127.{ZONE}" in zone_server.queries()
    assert [e["event"] for e in lines_for(server, "127.0.0.6")][:2] == ["connect", "tarpit_start"]


def test_a_dead_nameserver_leaves_the_client_suspicious_and_is_logged(silent_udp, tarpit_server, toml):
    env = wrapper_env(None, toml, TARPIT_DNSWL=ZONE, TARPIT_DNSWL_SERVER=f"127.0.0.1:{silent_udp}",
                      TARPIT_DNSWL_TIMEOUT="0.5")
    server = tarpit_server(RULES, env=env)
    deliver(server, "127.0.0.2")
    lines = lines_for(server, "127.0.0.2")
    assert (lines[0]["event"], lines[0]["what"], lines[0]["detail"]) == ("error", "dnswl", "timeout")
    assert [e["event"] for e in lines[1:3]] == ["connect", "tarpit_start"]
    assert lines[1]["class"] == "suspicious"


def test_no_query_unless_it_can_change_the_outcome(zone_server, tarpit_server, toml):
    # knob off: the listed suspicious 127.0.0.8 is tarpitted and never asked about;
    # knob on: the normal client 127.0.0.7 is never asked about, the suspicious 127.0.0.2 is
    off = tarpit_server(RULES, env=wrapper_env(None, toml))
    deliver(off, "127.0.0.8")
    assert off.events("connect")[0]["class"] == "suspicious" and off.events("tarpit_start")
    on = tarpit_server(RULES, env=wrapper_env(zone_server, toml))
    deliver(on, "127.0.0.7")
    assert on.events("connect")[0]["class"] == "normal"
    deliver(on, "127.0.0.2")
    zone_server.wait_query(f"2.0.0.127.{ZONE}")  # the log is written: the later query is in it
    asked = zone_server.queries()
    assert f"8.0.0.127.{ZONE}" not in asked and f"7.0.0.127.{ZONE}" not in asked, asked
    assert not [e for e in off.events() if e["event"] == "dnswl" or e.get("what") == "dnswl"]


def test_tcprules_forcing_a_class_is_not_overridden(zone_server, tarpit_server, toml):
    rules = f'127.0.0.2:allow,TCPREMOTEHOST="{DYNAMIC}",TARPIT_CLASS="suspicious"'
    server = tarpit_server(rules, env=wrapper_env(zone_server, toml))
    deliver(server, "127.0.0.2")
    assert [e["event"] for e in server.events()][:2] == ["connect", "tarpit_start"]


# --- tarpitctl check ----------------------------------------------------------------------

def ctl_check(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TARPIT")}
    full.update(TARPIT_CONTROL=str(tmp_path), **env)
    (tmp_path / "s25r-allow").write_text(".google.com\n")
    return subprocess.run(["tarpitctl", "check", "--no-store", "--tcpserver=-vRl0 -hp"],
                          capture_output=True, text=True, env=full, check=False)


def test_tarpitctl_check_says_the_zone_answers(zone_server, tmp_path):
    out = ctl_check(tmp_path, {"TARPIT_DNSWL": ZONE, "TARPIT_DNSWL_SERVER": f"127.0.0.1:{zone_server.port}"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"dnswl    {ZONE} answers: test entry 127.0.0.2 listed as 127.0.9.2 (level 2)" in out.stdout


def test_tarpitctl_check_warns_when_the_zone_refuses_us(zone_server, tmp_path):
    out = ctl_check(tmp_path, {"TARPIT_DNSWL": "list.dnswl.example",
                               "TARPIT_DNSWL_SERVER": f"127.0.0.1:{zone_server.port}"})
    assert out.returncode == 1 and "WARNING  dnswl list.dnswl.example: refused" in out.stdout, out.stdout
