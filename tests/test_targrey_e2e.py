"""taRgrey end to end: real tcpserver, wrapper, sink, and SQLite or a real redis-server."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import free_port, need, recv_reply

BOT, PATIENT = "127.0.0.3", "127.0.0.6"
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
KNOBS = 'TARPIT="2",TARPIT_GREYLIST_DELAY="2",TARPIT_GREYLIST_RETRIES="2"'
RULES = f"""
{BOT}:allow,TCPREMOTEHOST="{DYNAMIC}",{KNOBS}
{PATIENT}:allow,TCPREMOTEHOST="{DYNAMIC.replace('1234', '5678')}",{KNOBS}
"""
MSG = b"Subject: retry\r\n\r\nthird time lucky\r\n"


def attempt(server, src: str, *, give_up_after: float | None = None, deliver: bool = False,
            message: bytes = MSG, timeout: float = 10.0) -> bytes:
    """HELO, MAIL, RCPT (then DATA when `deliver` and the RCPT passes); returns the RCPT reply
    (b"" when we gave up during the tarpit after `give_up_after` seconds)."""
    sock = server.connect(src, timeout=timeout)
    try:
        assert recv_reply(sock).startswith(b"220")
        sock.sendall(b"HELO mx.example.net\r\n")
        assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"MAIL FROM:<news@example.net>\r\n")
        assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"RCPT TO:<bob@example.com>\r\n")
        if give_up_after is not None:
            sock.settimeout(give_up_after)
            try:
                return recv_reply(sock)
            except TimeoutError:
                return b""
        reply = recv_reply(sock)
        if deliver and reply.startswith(b"250"):
            sock.sendall(b"DATA\r\n")
            assert recv_reply(sock).startswith(b"354")
            sock.sendall(message + b".\r\n")
            assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"QUIT\r\n")
        recv_reply(sock)
        return reply
    finally:
        sock.close()


def wait_event(server, event: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(server.events(event)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.events(event)) >= n, server.log()


def test_bot_dropped_in_tarpit_is_greylisted_until_it_retries_like_an_mta(tarpit_server):
    server = tarpit_server(RULES)
    assert attempt(server, BOT, give_up_after=0.3) == b"", "gave up during the 2 s tarpit"
    wait_event(server, "tarpit_lost", 1)

    t = time.monotonic()
    early = attempt(server, BOT)
    assert early.startswith(b"450 4.7.1 <bob@example.com>: Greylisted"), early
    assert time.monotonic() - t < 1.5, "a recorded client is deferred at once, not tarpitted again"
    assert server.events("greylist_defer")[-1]["reason"] == "too_early"

    time.sleep(2.2)
    assert attempt(server, BOT).startswith(b"450 "), "first retry after the delay is still deferred"
    assert server.events("greylist_defer")[-1]["reason"] == "retry_count"
    assert attempt(server, BOT, deliver=True).startswith(b"250"), "second retry after the delay passes"
    assert server.messages() == [MSG]
    assert server.events("greylist_pass")[-1]["reason"] == "delay_passed"

    t = time.monotonic()
    assert attempt(server, BOT).startswith(b"250")
    assert time.monotonic() - t < 1.5, "auto-whitelisted after delivering: no tarpit"
    assert server.events("greylist_pass")[-1]["reason"] == "whitelisted"
    assert len(server.events("tarpit_start")) == 1


def test_patient_client_passes_on_first_contact(tarpit_server):
    server = tarpit_server(RULES)
    t = time.monotonic()
    assert attempt(server, PATIENT, deliver=True).startswith(b"250")
    assert time.monotonic() - t >= 1.9, "it sat through the tarpit"
    assert server.events("tarpit_done") and not server.events("greylist_defer")
    assert server.messages() == [MSG]


@pytest.fixture
def redis_url(tmp_path):
    binary = need("redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0", proc
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_two_mx_hosts_share_state_through_redis(tarpit_server, redis_url, tmp_path):
    url, _ = redis_url
    mx1 = tarpit_server(RULES, env={"TARPIT_GREYLIST_URL": url})
    assert attempt(mx1, BOT, give_up_after=0.3) == b""
    wait_event(mx1, "tarpit_lost", 1)
    mx2 = tarpit_server(RULES, env={"TARPIT_GREYLIST_URL": url})
    assert attempt(mx2, BOT).startswith(b"450 "), "MX 2 knows what MX 1 saw"
    assert mx2.events("greylist_defer")[-1]["reason"] == "too_early"


def test_redis_down_mail_still_flows_and_the_error_is_logged(tarpit_server, redis_url):
    url, proc = redis_url
    server = tarpit_server(RULES, env={"TARPIT_GREYLIST_URL": url})
    proc.kill()
    proc.wait()
    t = time.monotonic()
    assert attempt(server, PATIENT, deliver=True).startswith(b"250")
    assert time.monotonic() - t < 10
    assert server.messages() == [MSG]
    assert [e["what"] for e in server.events("error")][:1] == ["greylist"]


def test_greylist_network_size_is_configurable(tarpit_server):
    """With /32 keys a sibling address is a stranger: it gets its own first-contact tarpit."""
    rules = RULES.replace(KNOBS, KNOBS + ',TARPIT_GREYLIST_IPV4_PREFIX="32"')
    server = tarpit_server(rules)
    assert attempt(server, BOT, give_up_after=0.3) == b""
    wait_event(server, "tarpit_lost", 1)
    t = time.monotonic()
    assert attempt(server, PATIENT).startswith(b"250"), "127.0.0.6 is not 127.0.0.3 under /32"
    assert time.monotonic() - t >= 1.9
    assert not server.events("greylist_defer")
