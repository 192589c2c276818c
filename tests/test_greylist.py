"""taRgrey state machine and stores (libtarpit.greylist), and `tarpitctl greylist`.

State-machine tests run against both stores: a SQLite file and a real redis-server
started on loopback by the fixture below.  The clock is driven: every call gets `now`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import need
from libtarpit.errors import StoreError
from libtarpit.greylist import (
    Decision,
    Greylist,
    GreylistParams,
    client_key,
    defer_text,
    open_store,
)

REDIS_SERVER = "/usr/bin/redis-server"
T0 = 1_700_000_000.0
DAY = 86400.0
C, S, R = "192.0.2.0/24", "Alice@Example.ORG", "<bob@example.jp>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(tmp_dir, *extra: str, password: str | None = None) -> tuple[subprocess.Popen, int]:
    """Start redis-server on a free loopback port (plus `extra` options); return it and the port."""
    if not os.path.exists(REDIS_SERVER) and not shutil.which("redis-server"):
        need("redis-server")  # skips with the package name, or fails under TEST_REQUIRE_ALL
    binary = REDIS_SERVER if os.path.exists(REDIS_SERVER) else shutil.which("redis-server")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_dir), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(tmp_dir),
    )
    import redis

    client = redis.Redis(port=port, password=password, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not answer PING on port {port}")
            time.sleep(0.05)
    client.close()
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    proc, port = _start_redis(tmp_path_factory.mktemp("redis"))
    yield port
    _stop(proc)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "greylist.sqlite")
    port = request.getfixturevalue("redis_server")
    import redis

    redis.Redis(port=port).flushall()
    return f"redis://127.0.0.1:{port}/0"


def make(url: str, timeout: float = 2.0, **params) -> Greylist:
    return Greylist(open_store(url, timeout=timeout), GreylistParams(**params))


def records(g: Greylist, now: float) -> dict[tuple[str, str, str, str], int]:
    return {(r.kind, r.client, r.sender, r.rcpt): r.count for r in g.store.records(now)}


# ------------------------------------------------------------ state machine


def test_first_contact_is_tarpitted_and_sitting_through_passes(store_url):
    g = make(store_url)
    assert g.check(C, S, R, T0) == Decision("tarpit", "first_contact")
    g.tarpit_passed(C, S, R, T0 + 65)
    assert g.check(C, S, R, T0 + 100) == Decision("pass", "sat_through")
    assert records(g, T0 + 100) == {("pass", C, "alice@example.org", "bob@example.jp"): 0}


def test_dropping_during_tarpit_records_triple_and_client(store_url):
    g = make(store_url)
    g.tarpit_lost(C, S, R, T0 + 30)
    assert records(g, T0 + 31) == {
        ("grey", C, "alice@example.org", "bob@example.jp"): 0,
        ("tarpit", C, "", ""): 1,
    }


def test_early_retries_are_deferred_and_not_counted_then_second_retry_passes(store_url):
    g = make(store_url)
    g.tarpit_lost(C, S, R, T0)
    early = g.check(C, S, R, T0 + 200)
    assert (early.action, early.reason) == ("defer", "too_early")
    assert early.retry_after == pytest.approx(1000)
    assert defer_text(early) == "Greylisted, please try again in 1000 seconds"
    for minute in range(5, 20):
        assert g.check(C, S, R, T0 + minute * 60).reason == "too_early"
    first = g.check(C, S, R, T0 + 1200)
    assert first == Decision("defer", "retry_count", 0.0)
    assert defer_text(first) == "Greylisted, please try again later"
    assert g.check(C, S, R, T0 + 1500) == Decision("pass", "delay_passed")
    assert g.check(C, S, R, T0 + 9000) == Decision("pass", "delay_passed")


def test_retry_count_one_passes_the_first_retry_after_the_delay(store_url):
    g = make(store_url, retry_count=1, delay=300)
    g.tarpit_lost(C, S, R, T0)
    assert g.check(C, S, R, T0 + 299).reason == "too_early"
    assert g.check(C, S, R, T0 + 300).action == "pass"


def test_new_triple_from_client_that_dropped_is_greylisted_not_tarpitted(store_url):
    g = make(store_url)
    g.tarpit_lost(C, S, R, T0)
    d = g.check(C, "other@example.org", R, T0 + 60)
    assert d == Decision("defer", "new_triple", 1200.0)
    assert g.check(C, "other@example.org", R, T0 + 120).reason == "too_early"
    assert g.check("198.51.100.0/24", S, R, T0 + 60).action == "tarpit"


def test_delivery_clears_tarpit_record_and_whitelists_for_an_hour(store_url):
    g = make(store_url, retry_count=1)
    g.tarpit_lost(C, S, R, T0)
    assert g.check(C, S, R, T0 + 1300).action == "pass"
    g.delivered(C, T0 + 1301)
    kinds = {k[0] for k in records(g, T0 + 1302)}
    assert "tarpit" not in kinds and "white" in kinds
    assert g.check(C, "new@example.org", R, T0 + 1400) == Decision("pass", "whitelisted")
    assert g.check(C, "new@example.org", R, T0 + 1301 + 3599) == Decision("pass", "whitelisted")
    assert g.check(C, "new@example.org", R, T0 + 1301 + 3601) == Decision("tarpit", "first_contact")


def test_records_expire_after_35_days_unseen_and_purge_removes_them(store_url):
    g = make(store_url)
    g.tarpit_lost(C, S, R, T0)
    assert g.check(C, S, R, T0 + 34 * DAY).action == "defer"  # seen again: lives on
    later = T0 + 34 * DAY + 35 * DAY + 1
    assert g.check(C, S, R, later) == Decision("tarpit", "first_contact")
    assert g.purge(later) == 2
    assert g.store.records() == []


def test_mode_tarpit_only_never_defers(store_url):
    g = make(store_url, mode="tarpit")
    g.tarpit_lost(C, S, R, T0)
    for t in (T0 + 10, T0 + 1300, T0 + 1400):
        assert g.check(C, S, R, t) == Decision("tarpit", "first_contact")
    g.tarpit_passed(C, S, R, T0 + 1465)
    assert g.check(C, S, R, T0 + 1500) == Decision("pass", "sat_through")


def test_mode_greylist_only_never_tarpits(store_url):
    g = make(store_url, mode="greylist")
    assert g.check(C, S, R, T0) == Decision("defer", "new_triple", 1200.0)
    assert g.check(C, S, R, T0 + 600).reason == "too_early"
    assert g.check(C, S, R, T0 + 1200).reason == "retry_count"
    assert g.check(C, S, R, T0 + 1260) == Decision("pass", "delay_passed")


def test_plain_triplet_greylist_for_normal_clients_is_off_by_default(store_url):
    off = make(store_url)
    assert off.check(C, S, R, T0, suspicious=False) == Decision("pass", "off")
    assert off.store.records() == []
    on = make(store_url, greylist_normal=True)
    assert on.check(C, S, R, T0, suspicious=False) == Decision("defer", "new_triple", 1200.0)
    assert on.check(C, S, R, T0 + 60, suspicious=False).reason == "too_early"
    assert on.check(C, S, R, T0 + 1200, suspicious=False) == Decision("pass", "delay_passed")


def test_name_key_lets_a_sibling_host_of_the_pool_retry(store_url):
    params = GreylistParams(key="name")
    k1 = client_key("203.0.113.5", "mail1.example.net", params)
    k2 = client_key("198.51.100.9", "MAIL2.example.net.", params)
    assert k1 == k2 == "example.net"
    g = Greylist(open_store(store_url, timeout=2), params)
    g.tarpit_lost(k1, S, R, T0)
    assert g.check(k2, S, R, T0 + 1300).reason == "retry_count"
    assert g.check(k1, S, R, T0 + 1400).action == "pass"


def test_defer_text_rounds_up_and_says_later_without_a_time():
    assert defer_text(Decision("defer", "too_early", 1199.2)) == "Greylisted, please try again in 1200 seconds"
    assert defer_text(Decision("defer", "too_early", 0.4)) == "Greylisted, please try again in 1 second"
    assert defer_text(Decision("defer", "new_triple", None)) == "Greylisted, please try again later"


def test_client_key_networks_and_name_fallbacks():
    net = GreylistParams()
    name = GreylistParams(key="name")
    assert client_key("192.0.2.77", "mail1.example.net", net) == "192.0.2.0/24"
    assert client_key("2001:db8:1:2:aaaa::5", None, net) == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.9", None, net) == "192.0.2.0/24"
    assert client_key("192.0.2.77", "example.net", name) == "192.0.2.0/24"  # 2 labels
    assert client_key("192.0.2.77", None, name) == "192.0.2.0/24"
    assert client_key("192.0.2.77", "host.co.jp", name) == "192.0.2.0/24"  # registry
    assert client_key("192.0.2.77", "192-0-2-77.dyn.example.net", name) == "192.0.2.0/24"
    assert client_key("192.0.2.77", "x", GreylistParams(key="name", ipv4_prefix=32)) == "192.0.2.77/32"
    with pytest.raises(ValueError):
        client_key("not-an-ip", None, net)
    with pytest.raises(ValueError):
        GreylistParams(mode="strict")


# ------------------------------------------------------------ sharing and concurrency


_MX_B = """
import sys
from libtarpit.greylist import Greylist, GreylistParams, open_store
g = Greylist(open_store(sys.argv[1], timeout=2), GreylistParams())
now = float(sys.argv[2])
d = g.check(sys.argv[3], sys.argv[4], sys.argv[5], now)
print(d.action, d.reason)
"""


def test_two_mx_hosts_sharing_one_redis_see_each_others_records(redis_server):
    import redis

    redis.Redis(port=redis_server).flushall()
    url = f"redis://127.0.0.1:{redis_server}/0"
    mx_a = make(url)
    mx_a.tarpit_lost(C, S, R, T0)

    def mx_b(now: float) -> str:
        out = subprocess.run([sys.executable, "-c", _MX_B, url, str(now), C, S, R],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert mx_b(T0 + 60) == "defer too_early"
    assert mx_b(T0 + 1300) == "defer retry_count"  # counted on B ...
    assert mx_a.check(C, S, R, T0 + 1400) == Decision("pass", "delay_passed")  # ... seen by A


def _lose_tarpit(url: str, start, errors) -> None:
    g = make(url, timeout=20)
    start.wait(30)
    try:
        g.tarpit_lost(C, S, R, T0 + 1)
    except StoreError as e:
        errors.put(str(e))


def test_200_concurrent_updates_of_one_record_lose_none(store_url):
    ctx = multiprocessing.get_context("fork")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_lose_tarpit, args=(store_url, start, errors)) for _ in range(200)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert messages == []
    assert [p.exitcode for p in procs] == [0] * 200
    counts = records(make(store_url), T0 + 2)
    assert counts[("tarpit", C, "", "")] == 200


# ------------------------------------------------------------ failures


def test_redis_killed_mid_run_raises_store_error_promptly(tmp_path):
    proc, port = _start_redis(tmp_path)
    try:
        g = make(f"redis://127.0.0.1:{port}/0", timeout=0.5)
        g.tarpit_lost(C, S, R, T0)
        assert g.check(C, S, R, T0 + 10).action == "defer"
        _stop(proc)
        began = time.monotonic()
        with pytest.raises(StoreError):
            g.check(C, S, R, T0 + 20)
        with pytest.raises(StoreError):
            g.tarpit_lost(C, S, R, T0 + 30)
        assert time.monotonic() - began < 2.5
    finally:
        _stop(proc)


def test_redis_hanging_raises_store_error_after_the_timeout(tmp_path):
    proc, port = _start_redis(tmp_path)
    try:
        g = make(f"redis://127.0.0.1:{port}/0", timeout=0.5)
        assert g.check(C, S, R, T0).action == "tarpit"
        os.kill(proc.pid, signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(StoreError):
            g.tarpit_lost(C, S, R, T0 + 1)
        assert time.monotonic() - began < 2.5
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        _stop(proc)


def test_unreachable_redis_fails_at_first_use_not_at_open():
    store = open_store(f"redis://127.0.0.1:{_free_port()}/0", timeout=0.5)
    with pytest.raises(StoreError):
        Greylist(store, GreylistParams()).check(C, S, R, T0)


def test_bad_redis_url_is_a_store_error():
    with pytest.raises(StoreError):
        open_store("redis://127.0.0.1:notaport/0", timeout=0.5).records()


def test_sqlite_in_absent_directory_raises_store_error(tmp_path):
    g = make(str(tmp_path / "missing" / "greylist.sqlite"))
    with pytest.raises(StoreError):
        g.check(C, S, R, T0)


def test_sqlite_file_that_is_not_a_database_raises_store_error(tmp_path):
    # (a read-only directory would be the classic case, but tests run as root, which ignores it)
    bad = tmp_path / "greylist.sqlite"
    bad.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(StoreError):
        make(str(bad)).tarpit_lost(C, S, R, T0)


def test_sqlite_path_under_a_regular_file_raises_store_error(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(StoreError):
        make(str(tmp_path / "plain" / "greylist.sqlite")).check(C, S, R, T0)


def test_sqlite_locked_past_the_timeout_raises_store_error_not_hang(tmp_path):
    import sqlite3

    path = tmp_path / "greylist.sqlite"
    make(str(path)).tarpit_lost(C, S, R, T0)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        g = make(f"sqlite:///{path}", timeout=0.3)
        began = time.monotonic()
        with pytest.raises(StoreError):
            g.tarpit_lost(C, S, R, T0 + 1)
        assert time.monotonic() - began < 2.5
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# ------------------------------------------------------------ tarpitctl greylist


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tarpitctl from this tree, not an installed copy: wrappers/ is the package tarpit_wrappers
_TARPITCTL = (
    "import sys, types; sys.path.insert(0, sys.argv.pop(1)); "
    "m = types.ModuleType('tarpit_wrappers'); m.__path__ = [sys.path[0] + '/wrappers']; "
    "sys.modules['tarpit_wrappers'] = m; "
    "from tarpit_wrappers.tarpitctl import main; sys.exit(main(sys.argv[1:]))"
)


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TARPIT")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", _TARPITCTL, ROOT, "greylist", *args], capture_output=True,
                          text=True, env=full_env, timeout=60, cwd="/")


def test_ctl_list_whitelist_add_delete_purge(store_url):
    now = time.time()
    g = make(store_url)
    g.tarpit_lost(C, S, R, now)
    g.tarpit_lost("198.51.100.0/24", "<>", R, now - 40 * DAY)  # long expired
    env = {"TARPIT_GREYLIST_URL": store_url}

    out = ctl("list", env=env)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [(x[0], x[1], x[2], x[3], x[6]) for x in lines] == [
        ("tarpit", C, "-", "-", "1"),
        ("grey", C, "alice@example.org", "bob@example.jp", "0"),
    ]
    assert lines[0][4].endswith("Z") and lines[0][4][:4].isdigit()
    all_lines = ctl("list", "--all", env=env).stdout.splitlines()
    assert any("\t<>\t" in line for line in all_lines)

    added = ctl("whitelist-add", "203.0.113.7", "--seconds", "600", env=env)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("whitelisted\t203.0.113.0/24\t")
    key = client_key("203.0.113.200", None, GreylistParams())
    assert g.check(key, S, R, time.time()) == Decision("pass", "whitelisted")

    purged = ctl("--store", store_url, "purge")
    assert (purged.returncode, purged.stdout.strip()) == (0, "2")

    one = ctl("delete", C, "alice@example.org", "bob@example.jp", env=env)
    assert (one.returncode, one.stdout.strip()) == (0, "deleted 1")
    rest = ctl("delete", C, env=env)
    assert (rest.returncode, rest.stdout.strip()) == (0, "deleted 1")
    none = ctl("delete", C, env=env)
    assert (none.returncode, none.stdout.strip()) == (1, "deleted 0")
    kinds = [line.split("\t")[0] for line in ctl("list", env=env).stdout.splitlines()]
    assert kinds == ["white"]


def test_ctl_store_down_exits_111_with_message(tmp_path):
    out = ctl("--store", f"redis://127.0.0.1:{_free_port()}/0", "--timeout", "0.5", "list")
    assert out.returncode == 111
    assert "store error" in out.stderr and out.stdout == ""
    out = ctl("--store", str(tmp_path / "nodir" / "g.sqlite"), "purge")
    assert out.returncode == 111 and "store error" in out.stderr


def test_ctl_usage_errors_exit_100(tmp_path):
    assert ctl("--store", str(tmp_path / "g.sqlite"), "delete", C, "only-sender").returncode == 100
    assert ctl("frobnicate").returncode == 100


def test_params_for_mirrors_the_config_per_class():
    from libtarpit.config import load_config
    from libtarpit.greylist import params_for

    cfg = load_config({}, "greylist_ipv4_prefix = 32\ngreylist_delay = 300\ngreylist_key = 'name'\n"
                      "[normal]\ngreylist = 'greylist'\n", "tarpit.toml")
    sus = params_for(cfg, "suspicious")
    assert (sus.mode, sus.ipv4_prefix, sus.ipv6_prefix, sus.delay, sus.key, sus.greylist_normal) == (
        "targrey", 32, 64, 300, "name", False)
    assert params_for(cfg, "normal").greylist_normal is True
    assert params_for(cfg, "trusted") is None  # greylist off for trusted clients by default
    assert params_for(cfg, "trusted", mode="targrey").ipv4_prefix == 32


def test_ctl_keys_follow_the_configured_prefix_unless_an_option_overrides_it(tmp_path):
    from libtarpit.config import load_config
    from libtarpit.greylist import params_for

    toml = "greylist_ipv4_prefix = 32\n"
    (tmp_path / "tarpit.toml").write_text(toml)
    url = str(tmp_path / "greylist.sqlite")
    env = {"TARPIT_CONFIG": str(tmp_path / "tarpit.toml"), "TARPIT_GREYLIST_URL": url}
    cfg = load_config({}, toml, "tarpit.toml")
    wrapper_key = client_key("127.0.0.3", None, params_for(cfg, "suspicious"))
    assert wrapper_key == "127.0.0.3/32"

    added = ctl("whitelist-add", "127.0.0.3", "--seconds", "600", env=env)
    assert added.returncode == 0, added.stderr
    assert added.stdout.split("\t")[1] == wrapper_key
    store = open_store(url, timeout=2)
    assert [r.client for r in store.records(time.time())] == [wrapper_key]
    g = Greylist(store, params_for(cfg, "suspicious"))
    assert g.check(wrapper_key, S, R, time.time()) == Decision("pass", "whitelisted")

    wide = ctl("whitelist-add", "127.0.0.3", "--ipv4-prefix", "24", env=env)
    assert wide.stdout.split("\t")[1] == "127.0.0.0/24"
    assert ctl("delete", "127.0.0.3", env=env).stdout.strip() == "deleted 1"  # the /32 one
    assert [r.client for r in store.records(time.time())] == ["127.0.0.0/24"]
    assert ctl("delete", "127.0.0.3", "--ipv4-prefix", "24", env=env).stdout.strip() == "deleted 1"
    assert ctl("whitelist-add", "127.0.0.3", "--ipv4-prefix", "33", env=env).returncode == 100


def test_the_store_decides_on_the_callers_clock_only(store_url, monkeypatch):
    # the wall clock is far from T0 (and broken here): every answer follows `now` alone
    def no_wall_clock():
        raise AssertionError("time.time() called on the decision path")

    monkeypatch.setattr(time, "time", no_wall_clock)
    g = make(store_url)
    assert g.check(C, S, R, T0) == Decision("tarpit", "first_contact")
    g.tarpit_lost(C, S, R, T0)
    assert g.check(C, S, R, T0 + 600) == Decision("defer", "too_early", 600.0)
    assert g.check(C, S, R, T0 + 1300).reason == "retry_count"
    assert g.check(C, S, R, T0 + 1301) == Decision("pass", "delay_passed")
    g.delivered(C, T0 + 1302)
    assert g.check(C, "x@y", R, T0 + 1303) == Decision("pass", "whitelisted")
    # the whitelist ran out, and delivery cleared the tarpit record: a first contact again
    assert g.check(C, "x@y", R, T0 + 1302 + 3600) == Decision("tarpit", "first_contact")
    assert {kind for kind, *_ in records(g, T0 + 1302 + 3600)} == {"pass"}
    assert g.purge(T0 + 40 * DAY) == 2  # the passed triple and the expired whitelist record


from hypothesis import given as _given, strategies as _st  # noqa: E402


@_given(_st.integers(0, 2**32 - 1), _st.integers(0, 32))
def test_ipv4_network_keys_match_ipaddress_without_importing_it(n, prefix):
    import ipaddress

    from libtarpit.greylist import GreylistParams, client_key

    ip = str(ipaddress.IPv4Address(n))
    want = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
    assert client_key(ip, None, GreylistParams(ipv4_prefix=prefix)) == want


@pytest.mark.parametrize("bad", ["01.2.3.4", "1.2.3", "256.1.1.1", "1..3.4", "\u0661.2.3.4"])
def test_addresses_ipaddress_refuses_are_still_refused(bad):
    from libtarpit.greylist import GreylistParams, client_key

    with pytest.raises(ValueError):
        client_key(bad, None, GreylistParams())
