"""libtarpit.rdns against a real dnsmasq on loopback (plus two tiny fake servers for DNS trouble).

dnsmasq (Debian package dnsmasq-base) serves the zones the tests control:
  127.0.0.2 / 2001:db8::25  <-> mail.example.test      forward-confirmed, v4 and v6
  127.0.0.3  -> mail-x.google.com -> 192.0.2.1         spoofed PTR, not confirmed
  127.0.0.5  -> a-liar.example.test (A 192.0.2.9) and real.example.test (A 127.0.0.5)
  127.0.0.6  -> nowhere.example.test (no A at all)
  127.0.0.7  -> mx.elsewhere.example (a zone dnsmasq refuses)
  127.0.0.9, 2001:db8::99: no PTR
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from conftest import running_dnsmasq
from libtarpit.rdns import confirmed_name, parse_server

RECORDS = [
    "--host-record=mail.example.test,127.0.0.2,2001:db8::25",
    "--ptr-record=3.0.0.127.in-addr.arpa,mail-x.google.com",
    "--host-record=mail-x.google.com,192.0.2.1",
    "--ptr-record=5.0.0.127.in-addr.arpa,a-liar.example.test",
    "--host-record=a-liar.example.test,192.0.2.9",
    "--ptr-record=5.0.0.127.in-addr.arpa,real.example.test",
    "--host-record=real.example.test,127.0.0.5",
    "--ptr-record=6.0.0.127.in-addr.arpa,nowhere.example.test",
    "--ptr-record=7.0.0.127.in-addr.arpa,mx.elsewhere.example",
]
LOCAL_ZONES = ["127.in-addr.arpa", "2.0.192.in-addr.arpa", "ip6.arpa", "test", "google.com"]


@pytest.fixture(scope="module")
def dnsmasq():
    """dnsmasq serving RECORDS on a free port; yields the port."""
    with running_dnsmasq(RECORDS, LOCAL_ZONES) as server:
        yield server.port


def lookup(port: int, ip: str, timeout: float = 5.0) -> tuple[str | None, str | None]:
    return confirmed_name(ip, timeout, nameservers=["127.0.0.1"], port=port)


# --- the answers a postmaster relies on -------------------------------------------------

def test_forward_confirmed_name_is_returned(dnsmasq):
    assert lookup(dnsmasq, "127.0.0.2") == ("mail.example.test", None)


def test_ipv6_client_is_confirmed_through_aaaa(dnsmasq):
    assert lookup(dnsmasq, "2001:db8::25") == ("mail.example.test", None)
    assert lookup(dnsmasq, "2001:DB8:0:0::25") == ("mail.example.test", None)


def test_ipv4_mapped_address_is_looked_up_as_ipv4(dnsmasq):
    assert lookup(dnsmasq, "::ffff:127.0.0.2") == ("mail.example.test", None)


def test_spoofed_ptr_is_not_believed(dnsmasq):
    # 127.0.0.3's reverse zone claims mail-x.google.com, whose A record is elsewhere
    assert lookup(dnsmasq, "127.0.0.3") == (None, None)


def test_first_confirming_name_among_several_ptrs(dnsmasq):
    assert lookup(dnsmasq, "127.0.0.5") == ("real.example.test", None)


def test_ptr_name_without_address_is_not_confirmed(dnsmasq):
    assert lookup(dnsmasq, "127.0.0.6") == (None, None)


@pytest.mark.parametrize("ip", ["127.0.0.9", "2001:db8::99"])
def test_no_ptr_is_no_name_without_error(dnsmasq, ip):
    assert lookup(dnsmasq, ip) == (None, None)


def test_refused_reverse_lookup_is_an_error(dnsmasq):
    assert lookup(dnsmasq, "10.1.2.3") == (None, "refused")


def test_refused_forward_lookup_is_an_error(dnsmasq):
    assert lookup(dnsmasq, "127.0.0.7") == (None, "refused")


# --- DNS trouble: bounded in time, never an exception ------------------------------------

@pytest.fixture
def silent_udp():
    """A bound UDP port on 127.0.0.1 that reads nothing and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_timeout_returns_within_the_limit(silent_udp):
    start = time.monotonic()
    result = confirmed_name("127.0.0.2", 1.0, nameservers=["127.0.0.1"], port=silent_udp)
    assert result == (None, "timeout")
    assert time.monotonic() - start < 1.0 + 3.0


def test_zero_timeout_does_not_query(silent_udp):
    start = time.monotonic()
    assert confirmed_name("127.0.0.2", 0, nameservers=["127.0.0.1"], port=silent_udp) == (None, "timeout")
    assert time.monotonic() - start < 1.0


Handler = Callable[["dns.message.Message"], "dns.message.Message | None"]


@pytest.fixture
def fake_dns():
    """Factory: a UDP server on 127.0.0.1 answering with handler(query) (None: no reply)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(handler: Handler) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.05)

        def serve() -> None:
            with sock:
                while not stop.is_set():
                    try:
                        data, peer = sock.recvfrom(4096)
                    except TimeoutError:
                        continue
                    reply = handler(dns.message.from_wire(data))
                    if reply is not None:
                        sock.sendto(reply.to_wire(), peer)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return sock.getsockname()[1]

    yield start
    stop.set()
    for t in threads:
        t.join(timeout=5)


def ptr_only(*targets: str) -> Handler:
    """Answer PTR queries with `targets`; drop every other query."""
    def handler(query):
        q = query.question[0]
        if q.rdtype != dns.rdatatype.PTR:
            return None
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", "PTR", *targets))
        return reply
    return handler


def test_servfail_is_an_error(fake_dns):
    def servfail(query):
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.SERVFAIL)
        return reply
    port = fake_dns(servfail)
    assert confirmed_name("127.0.0.2", 5.0, nameservers=["127.0.0.1"], port=port) == (None, "servfail")


def test_deadline_is_shared_between_ptr_and_forward_queries(fake_dns):
    # five PTR names whose A queries never get an answer: one deadline for all, not one each
    port = fake_dns(ptr_only(*(f"h{i}.example.test." for i in range(5))))
    start = time.monotonic()
    assert confirmed_name("127.0.0.8", 1.0, nameservers=["127.0.0.1"], port=port) == (None, "timeout")
    assert time.monotonic() - start < 4.0


def test_name_comes_back_lowercase_without_dot(fake_dns):
    def handler(query):
        q = query.question[0]
        reply = dns.message.make_response(query)
        if q.rdtype == dns.rdatatype.PTR:
            reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", "PTR", "MX1.Example.TEST."))
        else:
            reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", "127.0.0.8"))
        return reply
    port = fake_dns(handler)
    assert confirmed_name("127.0.0.8", 5.0, nameservers=["127.0.0.1"], port=port) == ("mx1.example.test", None)


# --- API edges ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "mail.example.test", "127.0.0.256", "1.2.3"])
def test_not_an_ip_raises_value_error(bad):
    with pytest.raises(ValueError):
        confirmed_name(bad, 1.0, nameservers=["127.0.0.1"], port=9)


def test_importing_the_module_does_not_load_dnspython():
    code = "import sys, libtarpit.rdns; print('dns' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", (["127.0.0.1"], 53)),
    ("127.0.0.1:5353", (["127.0.0.1"], 5353)),
    (" 10.0.0.53:53 ", (["10.0.0.53"], 53)),
    ("[::1]:5353", (["::1"], 5353)),
    ("[2001:db8::53]", (["2001:db8::53"], 53)),
    ("::1", (["::1"], 53)),
])
def test_parse_server(text, expected):
    assert parse_server(text) == expected


@pytest.mark.parametrize("bad", ["", "dns.example.test", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
                                 "127.0.0.1:x", "[::1", "[::1]x", "[::1]:", "[127.0.0.1:53"])
def test_parse_server_rejects(bad):
    with pytest.raises(ValueError):
        parse_server(bad)


def test_parse_server_result_drives_a_lookup(dnsmasq):
    nameservers, port = parse_server(f"127.0.0.1:{dnsmasq}")
    assert confirmed_name("127.0.0.2", 5.0, nameservers=nameservers, port=port) == ("mail.example.test", None)


def test_wrapper_looks_names_up_itself_under_tcpserver_minus_H(dnsmasq, tarpit_server):
    """tcpserver -H gives no TCPREMOTEHOST; TARPIT_RDNS=1 makes the wrapper ask DNS, forward-confirmed."""
    env = {"TARPIT_RDNS": "1", "TARPIT_RDNS_SERVER": f"127.0.0.1:{dnsmasq}", "TARPIT_GREYLIST": "off",
           "TARPIT": "1"}
    server = tarpit_server("", env=env, control_files={"s25r-allow": ".google.com\n"})
    for src in ("127.0.0.2", "127.0.0.3"):
        sock = server.connect(src)
        assert sock.recv(1000).startswith(b"220")
        sock.close()
        server.wait_log(rf"ip={src.replace('.', '[.]')} .*event=(exec|end)")
    by_ip = {e["ip"]: e for e in server.events("connect")}
    assert by_ip["127.0.0.2"]["host"] == "mail.example.test" and by_ip["127.0.0.2"]["class"] == "normal"
    spoofed = by_ip["127.0.0.3"]
    assert spoofed["host"] == "-", "a PTR that does not resolve back is no name"
    assert spoofed["class"] == "suspicious" and spoofed["rule"] == "0", "the forged google name is not allow-listed"


def test_deadline_runs_on_the_callers_clock(dnsmasq):
    # the PTR answer comes at once, but by the caller's clock the budget is then spent:
    # the forward query is not sent and the answer is "timeout"
    ticks = iter([0.0, 0.0, 10.0, 10.0, 10.0])
    assert confirmed_name("127.0.0.2", 5.0, nameservers=["127.0.0.1"], port=dnsmasq,
                          clock=lambda: next(ticks)) == (None, "timeout")
    still = iter([0.0, 1.0, 2.0])  # within the budget: confirmed as usual
    assert confirmed_name("127.0.0.2", 5.0, nameservers=["127.0.0.1"], port=dnsmasq,
                          clock=lambda: next(still)) == ("mail.example.test", None)


def test_importing_the_module_does_not_load_typing():
    # -S: no site module, whose .pth files may load typing before we start
    code = "import sys, libtarpit.rdns; print('typing' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
