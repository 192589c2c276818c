"""The Redis store's own client (libtarpit.greystore._Resp) against a real redis-server.

What the state-machine tests in test_greylist.py do not cover: URL forms (password and db
in the URL, unix sockets, rediss:// through redis-py), the connection path staying free of
redis-py and asyncio, the Lua script agreeing with apply_hit, and timeouts on a server
that never answers.  Servers are started by test_greylist._start_redis on free loopback ports.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time

import pytest

from libtarpit import greystore
from libtarpit.errors import StoreError
from libtarpit.greylist import Decision, Greylist, GreylistParams, open_store
from libtarpit.greystore import TARPIT, TRIPLE, WHITE, Hit, apply_hit, parse_redis_url
from test_greylist import ROOT, _free_port, _start_redis, _stop, redis_server  # noqa: F401 (fixture)

T0 = 1_700_000_000.0
C, S, R = "192.0.2.0/24", "alice@example.org", "bob@example.jp"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A redis-server with a password, also on a unix socket: (port, socket path)."""
    tmp = tmp_path_factory.mktemp("redis-auth")
    sock = str(tmp / "redis.sock")
    proc, port = _start_redis(tmp, "--requirepass", "s3cret@x", "--unixsocket", sock,
                              "--unixsocketperm", "700", password="s3cret@x")
    yield port, sock
    _stop(proc)


def _raw(port: int, db: int):
    import redis

    return redis.Redis(port=port, db=db, password="s3cret@x")


def test_password_and_db_in_the_url_reach_that_database(secured):
    port, _ = secured
    _raw(port, 3).flushdb()
    g = Greylist(open_store(f"redis://:s3cret%40x@127.0.0.1:{port}/3", timeout=1), GreylistParams())
    g.tarpit_lost(C, S, R, T0)
    assert g.check(C, S, R, T0 + 60).reason == "too_early"
    assert len(_raw(port, 3).keys("tarpit:greylist:*")) == 2
    assert _raw(port, 0).keys("tarpit:greylist:*") == []


def test_unix_socket_with_db_and_password_options(secured):
    port, sock = secured
    _raw(port, 2).flushdb()
    store = open_store(f"unix://{sock}?db=2&password=s3cret%40x", timeout=1)
    Greylist(store, GreylistParams()).whitelist_add(C, 600, T0)
    assert [r.client for r in store.records(T0)] == [C]
    assert len(_raw(port, 2).keys("tarpit:greylist:*")) == 1


def test_wrong_password_or_database_is_a_store_error_and_writes_nothing(secured):
    port, _ = secured
    _raw(port, 0).flushdb()
    with pytest.raises(StoreError, match="AUTH") as e:
        open_store(f"redis://:wrong@127.0.0.1:{port}/0", timeout=1).hit(WHITE, C, "", "", T0, Hit(ttl=60))
    assert "wrong" not in str(e.value)  # the password never reaches a log line
    with pytest.raises(StoreError, match="SELECT"):  # db 99 of 16: must not fall back to db 0
        open_store(f"redis://:s3cret%40x@127.0.0.1:{port}/99", timeout=1).hit(WHITE, C, "", "", T0, Hit(ttl=60))
    with pytest.raises(StoreError, match="NOAUTH"):
        open_store(f"redis://127.0.0.1:{port}/0", timeout=1).records()
    assert _raw(port, 0).keys("*") == []


def test_url_forms():
    assert parse_redis_url("redis://h") == (None, "h", 6379, 0, None, None)
    assert parse_redis_url("redis://u:p%3Aw@[::1]:7000/4") == (None, "::1", 7000, 4, "u", "p:w")
    assert parse_redis_url("redis://:pw@h:1/2?db=5") == (None, "h", 1, 5, None, "pw")  # as redis-py
    assert parse_redis_url("unix:///run/r.sock?db=1") == ("/run/r.sock", None, 0, 1, None, None)
    for bad in ("redis://h:notaport", "redis://h?ssl_cert_reqs=none", "unix://", "redis://u@h", "http://h"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)
        with pytest.raises(StoreError):
            greystore.RedisStore(bad, timeout=0.5).records()
    assert greystore._safe_url("redis://u:secret@h:1/2?password=x") == "redis://h:1/2"


def test_the_connection_path_imports_neither_redis_py_nor_asyncio(redis_server):
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from libtarpit import greylist as gl;"
        "g = gl.Greylist(gl.open_store(sys.argv[2], timeout=1), gl.GreylistParams());"
        "g.check('198.51.100.0/24', 'a@b', 'c@d', time.time()); g.delivered('198.51.100.0/24', time.time());"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'asyncio', 'sqlite3', 'hashlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code, ROOT, f"redis://127.0.0.1:{redis_server}/0"],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_lua_script_agrees_with_apply_hit(redis_server):
    store = open_store(f"redis://127.0.0.1:{redis_server}/5", timeout=1)
    store.purge(T0 + 1e9)
    rng = random.Random(1)
    models: dict[tuple[str, str, str, str], object] = {}
    now = T0
    for i in range(300):
        now += rng.choice([0.25, 1, 30, 600, 1300, 4000])
        table = rng.choice([TRIPLE, TARPIT, WHITE])
        client = rng.choice(["192.0.2.0/24", "example.net"])
        sender, rcpt = (rng.choice(["", "a@x"]), "r@y") if table == TRIPLE else ("", "")
        hit = Hit(ttl=rng.choice([60, 1200, 3600]), add=rng.choice([0, 0, 1]),
                  count_before=rng.choice([None, now - 1200]), pass_at=rng.choice([None, 1, 2]),
                  set_passed=rng.random() < 0.1)
        key = (table, client, sender, rcpt)
        expected = apply_hit(models.get(key), key, now, hit)
        old = models.get(key)
        got, created = store.hit(table, client, sender, rcpt, now, hit)
        assert got == expected, (i, hit)
        assert created == (old is None or not old.live(now))
        models[key] = expected


def test_script_flushed_by_the_server_is_loaded_again(redis_server):
    import redis

    redis.Redis(port=redis_server).script_flush()
    store = open_store(f"redis://127.0.0.1:{redis_server}/6", timeout=1)
    rec, created = store.hit(WHITE, C, "", "", T0, Hit(ttl=60, add=1))
    assert (rec.count, created) == (1, True)
    redis.Redis(port=redis_server).script_flush()
    assert store.hit(WHITE, C, "", "", T0 + 1, Hit(ttl=60, add=1))[0].count == 2


def test_redis_py_transport_gives_the_same_answers(redis_server, monkeypatch):
    import redis

    redis.Redis(port=redis_server, db=7).flushdb()
    monkeypatch.setattr(greystore, "_REDIS_PY_SCHEMES", ("redis://",))
    store = open_store(f"redis://127.0.0.1:{redis_server}/7", timeout=1)
    assert type(store._transport()).__name__ == "_RedisPy"
    redis.Redis(port=redis_server).script_flush()  # the NOSCRIPT path through redis-py too
    g = Greylist(store, GreylistParams())
    assert g.check(C, S, R, T0) == Decision("tarpit", "first_contact")
    g.tarpit_lost(C, S, R, T0)
    assert g.check(C, S, R, T0 + 1300) == Decision("defer", "retry_count", 0.0)
    assert g.check(C, S, R, T0 + 1400) == Decision("pass", "delay_passed")
    assert store.delete(C) == 2
    assert store.records() == []


def test_server_that_never_answers_raises_store_error_after_the_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        store = open_store(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", timeout=0.3)
        began = time.monotonic()
        with pytest.raises(StoreError, match="timed out"):
            store.view(C, S, R, T0)
        assert 0.25 < time.monotonic() - began < 1.5


def test_dropped_connection_is_a_store_error_and_the_next_call_reconnects(tmp_path):
    import redis

    proc, port = _start_redis(tmp_path)
    store = open_store(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        store.hit(WHITE, C, "", "", T0, Hit(ttl=600))
        redis.Redis(port=port).client_kill_filter(_type="normal")  # every client but the one asking
        with pytest.raises(StoreError, match="closed|reset"):
            store.view(C, S, R, T0)
        assert store.view(C, S, R, T0).white is not None  # reconnected
        _stop(proc)
        with pytest.raises(StoreError):
            store.view(C, S, R, T0)
        with pytest.raises(StoreError, match="refused"):
            store.view(C, S, R, T0)
    finally:
        _stop(proc)


def _tls_files(tmp) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (Debian package openssl)")
    key, cert = str(tmp / "key.pem"), str(tmp / "cert.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return key, cert


def test_rediss_goes_through_redis_py_with_tls(tmp_path):
    key, cert = _tls_files(tmp_path)
    tls_port = _free_port()
    proc, _ = _start_redis(tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                           "--tls-ca-cert-file", cert, "--tls-auth-clients", "no")
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        g = Greylist(open_store(url, timeout=2), GreylistParams())
        assert g.check(C, S, R, T0) == Decision("tarpit", "first_contact")
        g.tarpit_lost(C, S, R, T0)
        assert g.check(C, S, R, T0 + 60).reason == "too_early"
        assert type(g.store._transport()).__name__ == "_RedisPy"
        plain = open_store(f"redis://127.0.0.1:{tls_port}/0", timeout=0.5)  # TLS port, no TLS
        with pytest.raises(StoreError):
            plain.records()
    finally:
        _stop(proc)
