"""The checks module: verdicts, actions applied in one place, and what needs the proxy."""

from __future__ import annotations

import pytest

from libtarpit import checks
from libtarpit.config import DEFAULTS, load_config
from libtarpit.session import Lists, Log, SendBackend, SendClient, Session, classify

BOT = classify("93.184.216.34", "p1-2.dyn.example.net", relayclient=False, verdict=None)._replace(cls="suspicious")
BANNER = b"220 backend ESMTP\r\n"


def session_for(policy, client=BOT) -> Session:
    s = Session(client, policy, Lists(), None, 0.0, proxy=True)
    s.start()
    s.backend_data(BANNER, 0.0)
    return s


def sent(acts, kind) -> bytes:
    return b"".join(a.data for a in acts if isinstance(a, kind))


@pytest.mark.parametrize("helo, refused", [
    ("[8.8.8.8]", True),              # somebody else's public address: ours, typically (seed 003)
    ("[93.184.216.34]", False),       # the client's own
    ("[IPv6:2a00:1450::1]", True),
    ("mail.example.org", False),      # a name is not this check's business
    ("[10.1.2.3]", False),            # behind NAT a client can only name its private address
    ("[127.0.0.1]", False),
])
def test_helo_literal_other_than_the_clients_own_address_is_refused(helo, refused):
    s = session_for(DEFAULTS["suspicious"])
    acts = s.client_data(f"EHLO {helo}\r\n".encode(), 1.0)
    if refused:
        assert sent(acts, SendClient).startswith(b"553 5.7.1") and sent(acts, SendBackend) == b""
        [log] = [a for a in acts if isinstance(a, Log)]
        assert log.event == "helo_reject" and ("reason", "literal") in log.fields
    else:
        assert sent(acts, SendBackend) == f"EHLO {helo}\r\n".encode()


def test_helo_literal_is_off_for_normal_clients_and_its_action_is_a_knob():
    normal = BOT._replace(cls="normal")
    assert sent(session_for(DEFAULTS["normal"], normal).client_data(b"EHLO [8.8.8.8]\r\n", 1.0),
                SendBackend) == b"EHLO [8.8.8.8]\r\n"
    warn = load_config({"TARPIT_ACTION_HELO_LITERAL": "warn"}).policy("suspicious")
    acts = session_for(warn).client_data(b"EHLO [8.8.8.8]\r\n", 1.0)
    assert sent(acts, SendBackend) == b"EHLO [8.8.8.8]\r\n"
    assert [a.fields[0] for a in acts if isinstance(a, Log)] == [("mode", "warn")]


@pytest.mark.parametrize("action, outcome", [("ignore", "pass"), ("warn", "warn"),
                                             ("enforce", "enforce"), ("drop", "drop")])
def test_outcome_is_one_exhaustive_match(action, outcome):
    assert checks.outcome(action) == outcome


def test_an_unknown_action_is_our_bug_not_a_pass():
    with pytest.raises(ValueError):
        checks.outcome("enforced")


def test_every_check_has_an_action_knob_with_per_class_defaults():
    for c in checks.CHECKS.values():
        assert len(c.defaults) == 3 and set(c.defaults) <= set(checks.ACTIONS)
        for i, cls in enumerate(("trusted", "suspicious", "normal")):
            assert DEFAULTS[cls].action(c.name) == c.defaults[i]
        assert load_config({f"TARPIT_ACTION_{c.name.upper()}": "drop"}).policy("normal").action(c.name) == "drop"
