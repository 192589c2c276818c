"""Configuration values that used to be accepted without a word: each is an error at start now."""

from __future__ import annotations

import pytest

from libtarpit.config import ConfigError, load_config


@pytest.mark.parametrize("env, toml", [
    ({}, '[suspicious]\ntarpit = "65"\n'),          # a string where TOML has numbers
    ({}, "[normal]\nrecipient_limit = 5.5\n"),
    ({"TARPIT": "1e9"}, None),                       # a 31-year tarpit
    ({"TARPIT_GREYLIST_URL": "redis//mx1:6379"}, None),  # a URL typo, not a SQLite file name
    ({"TARPIT_GREYLIST_URL": "redis:/mx1"}, None),
    ({"TARPIT_ACTION_HELO_NODOT": "enforced"}, None),
])
def test_silent_misconfiguration_is_loud(env, toml):
    with pytest.raises(ConfigError):
        load_config(env, toml)


def test_bounds_are_in_the_message():
    with pytest.raises(ConfigError, match=r"seconds, 0 to 86400"):
        load_config({"TARPIT": "86401"})
    assert load_config({"TARPIT": "86400"}).policy("normal").tarpit == 86400.0
    assert load_config({"TARPIT_GREYLIST_URL": "/var/lib/tarpit-smtpd/greylist.sqlite"}).greylist_url


def test_old_switches_still_mean_off():
    pol = load_config({"TARPIT_HELO_CHECK": "0", "TARPIT_RCPT_CHECK": "no"}).policy("suspicious")
    assert (pol.helo, pol.helo_nodot, pol.rcpt) == ("ignore", "ignore", "ignore")
    pol = load_config({}, "[normal]\nrcpt_check = false\n").policy("normal")
    assert pol.rcpt == "ignore"


@pytest.mark.parametrize("env", [
    {"TARPIT_DNSWL": "list..dnswl.org"},           # an empty label
    {"TARPIT_DNSWL": "list.dnswl.org/"},
    {"TARPIT_DNSWL_MIN_LEVEL": "255"},              # 127.0.0.255 is a refusal, never a level
    {"TARPIT_DNSWL_MIN_LEVEL": "-1"},
    {"TARPIT_DNSWL_TIMEOUT": "0"},                  # a query that may not take any time
    {"TARPIT_DNSWL_TIMEOUT": "61"},
    {"TARPIT_DNSWL_SERVER": "dns.example.org"},     # finding the DNS server would need DNS
])
def test_dnswl_values_are_checked_at_start(env):
    with pytest.raises(ConfigError, match="dnswl"):
        load_config(env)


def test_dnswl_is_off_by_default_and_an_empty_zone_means_off():
    assert load_config({}).dnswl_zone == ""
    assert load_config({"TARPIT_DNSWL": ""}, 'dnswl_zone = "list.dnswl.org"\n').dnswl_zone == ""
