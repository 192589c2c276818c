"""Admission: one pure decision per connection; the route follows from the checks that are on."""

from __future__ import annotations

import pytest

from libtarpit import admission
from libtarpit.config import load_config
from libtarpit.controldir import ControlDir

NORMAL_ENV = {"TCPREMOTEIP": "192.0.2.1", "TCPREMOTEHOST": "mail.example.org"}
BOT_ENV = {"TCPREMOTEIP": "192.0.2.9", "TCPREMOTEHOST": "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"}


def admit(tmp_path, env, files=None, **knobs):
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    cfg = load_config({**env, **knobs})
    return admission.admit(env, cfg, ControlDir(str(tmp_path)), 0.0)


def test_a_normal_client_with_nothing_to_check_is_execed(tmp_path):
    adm = admit(tmp_path, NORMAL_ENV)
    assert (adm.route, adm.proxy_for, adm.client.cls) == ("exec", (), "normal")


@pytest.mark.parametrize("files, knobs, reason", [
    ({"badheloarg": "localhost\n"}, {}, "helo"),
    ({"rcptusers": "bob\n"}, {}, "rcpt"),
    ({}, {"TARPIT": "5"}, "tarpit"),
    ({}, {"TARPIT_GREYLIST": "greylist"}, "greylist"),
    ({}, {"TARPIT_ACTION_HELO_NODOT": "enforce"}, "helo_nodot"),
    ({}, {"TARPIT_HIDE_PIPELINING": "1"}, "hide_pipelining"),
    ({}, {"TARPIT_RCPT_LIMIT": "5"}, "recipient_limit"),   # a limit somebody set must apply
    ({}, {"TARPIT_TIMEOUT": "30"}, "idle_timeout"),
    ({}, {"TARPIT_SESSION_LIMIT": "600"}, "session_limit"),
])
def test_each_check_that_is_on_routes_through_the_proxy(tmp_path, files, knobs, reason):
    adm = admit(tmp_path, NORMAL_ENV, files, **knobs)
    assert adm.route == "proxy" and reason in adm.proxy_for, adm.proxy_for


@pytest.mark.parametrize("files, knobs", [
    ({"badheloarg": "localhost\n"}, {"TARPIT_ACTION_HELO": "ignore"}),
    ({"rcptusers": "bob\n"}, {"TARPIT_RCPT_CHECK": "0"}),   # the old switch still means off
    ({}, {"TARPIT": "5", "TARPIT_ACTION_TARPIT": "ignore"}),
])
def test_a_check_turned_off_does_not_cost_the_fast_path(tmp_path, files, knobs):
    assert admit(tmp_path, NORMAL_ENV, files, **knobs).route == "exec"


def test_suspicious_client_is_proxied_for_tarpit_and_greylist_with_its_key(tmp_path):
    adm = admit(tmp_path, BOT_ENV)
    assert adm.client.cls == "suspicious" and adm.route == "proxy"
    assert {"tarpit", "greylist", "hide_pipelining"} <= set(adm.proxy_for)
    assert adm.client.key == "192.0.2.0/24" and adm.greylist.mode == "targrey"


def test_relayclient_is_trusted_without_reading_the_allow_list(tmp_path):
    adm = admit(tmp_path, {**BOT_ENV, "RELAYCLIENT": ""}, {"s25r-allow": "/broken[/\n"})
    assert adm.client.cls == "trusted" and adm.route == "exec"


def test_a_broken_list_or_a_missing_control_directory_refuses_with_451(tmp_path):
    adm = admit(tmp_path, BOT_ENV, {"s25r-allow": "/broken[/\n"})
    assert adm.route == "refuse" and adm.reply.startswith(b"451 ")
    assert [log.event for log in adm.logs] == ["error"]
    cfg = load_config(NORMAL_ENV)
    adm = admission.admit(NORMAL_ENV, cfg, ControlDir(str(tmp_path / "typo")), 0.0)
    assert adm.route == "refuse" and "does not exist" in dict(adm.logs[0].fields)["detail"]


def test_over_limit_turns_the_decision_into_a_421(tmp_path):
    adm = admit(tmp_path, NORMAL_ENV, TARPIT_MAX_PER_IP="2")
    assert adm.limit == 2
    refused = admission.over_limit(adm)
    assert refused.route == "refuse" and refused.reply.startswith(b"421 4.7.0")
    assert [log.event for log in refused.logs] == ["connect", "conn_limit"]


def test_rdns_answer_is_a_fact_in_and_its_error_a_log_line(tmp_path):
    cfg = load_config({"TARPIT_RDNS": "1"})
    env = {"TCPREMOTEIP": "192.0.2.9"}
    assert admission.wants_rdns(env, cfg)
    assert not admission.wants_rdns({**env, "RELAYCLIENT": ""}, cfg)
    adm = admission.admit(env, cfg, ControlDir(str(tmp_path)), 0.0, rdns=(None, "timeout"))
    assert adm.client.cls == "suspicious" and adm.client.rule == 0
    assert [dict(log.fields)["what"] for log in adm.logs] == ["rdns"]


# --- DNSWL: asked only when it can change the outcome; its answer is a fact in -----------------

def test_dnswl_is_wanted_only_for_a_client_s25r_made_suspicious(tmp_path):
    lists = ControlDir(str(tmp_path))
    on = load_config({"TARPIT_DNSWL": "list.dnswl.org"})
    assert admission.wants_dnswl(admission.admit(BOT_ENV, on, lists, 0.0), on)
    assert not admission.wants_dnswl(admission.admit(NORMAL_ENV, on, lists, 0.0), on)
    assert not admission.wants_dnswl(admission.admit({**BOT_ENV, "RELAYCLIENT": ""}, on, lists, 0.0), on)
    forced = load_config({"TARPIT_DNSWL": "list.dnswl.org", "TARPIT_CLASS": "suspicious"})
    assert not admission.wants_dnswl(admission.admit(NORMAL_ENV, forced, lists, 0.0), forced)
    off = load_config({})
    assert not admission.wants_dnswl(admission.admit(BOT_ENV, off, lists, 0.0), off)
    broken = admission.admit(BOT_ENV, on, ControlDir(str(tmp_path / "typo")), 0.0)
    assert broken.route == "refuse" and not admission.wants_dnswl(broken, on)


def test_a_dnswl_listing_makes_a_suspicious_client_trusted_like_an_allow_list_entry(tmp_path):
    from libtarpit.dnswl import Result

    cfg = load_config({"TARPIT_DNSWL": "list.dnswl.org"})
    adm = admission.admit(BOT_ENV, cfg, ControlDir(str(tmp_path)), 0.0, dnswl=Result("127.0.9.2", 2))
    assert (adm.client.cls, adm.client.reason, adm.client.rule, adm.route) == ("trusted", "dnswl", 1, "exec")
    assert adm.greylist is None and adm.proxy_for == ()
    assert [(log.event, dict(log.fields)) for log in adm.logs] == [("dnswl", {"answer": "127.0.9.2", "level": 2})]


@pytest.mark.parametrize("result, line", [
    (("127.0.0.255", None, "blocked"), ("error", {"what": "dnswl", "detail": "blocked 127.0.0.255"})),
    ((None, None, "timeout"), ("error", {"what": "dnswl", "detail": "timeout"})),
    (("127.0.9.0", 0, None), ("dnswl", {"answer": "127.0.9.0", "level": 0})),  # below dnswl_min_level 1
    ((None, None, None), None),                                                # not listed: no line
])
def test_what_does_not_trust_leaves_the_client_suspicious(tmp_path, result, line):
    from libtarpit.dnswl import Result

    cfg = load_config({"TARPIT_DNSWL": "list.dnswl.org"})
    adm = admission.admit(BOT_ENV, cfg, ControlDir(str(tmp_path)), 0.0, dnswl=Result(*result))
    assert adm.client.cls == "suspicious" and adm.route == "proxy" and "tarpit" in adm.proxy_for
    assert [(log.event, dict(log.fields)) for log in adm.logs] == ([line] if line else [])


def test_a_dnswl_answer_does_not_touch_a_client_that_is_not_suspicious(tmp_path):
    from libtarpit.dnswl import Result

    cfg = load_config({"TARPIT_DNSWL": "list.dnswl.org", "TARPIT_CLASS": "suspicious"})
    adm = admission.admit(NORMAL_ENV, cfg, ControlDir(str(tmp_path)), 0.0, dnswl=Result("127.0.9.3", 3))
    assert adm.client.cls == "suspicious" and adm.logs == (), "TARPIT_CLASS from tcprules wins"


def test_a_misspelt_variable_is_named_on_every_connection_and_ignored(tmp_path):
    adm = admit(tmp_path, {**NORMAL_ENV, "TARPIT_TARPTI": "60", "TARPIT_CONTROL": str(tmp_path)})
    errors = [dict(line.fields) for line in adm.logs if line.event == "error"]
    assert errors == [{"what": "variable", "detail": "TARPIT_TARPTI: unknown, ignored"}]
    assert adm.route == "exec", "the session goes on as if it were not there"
