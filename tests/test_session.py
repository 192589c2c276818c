"""The sans-I/O session: bytes and time in, actions out; no sockets, no processes."""

from __future__ import annotations



import pytest
from hypothesis import given, settings, strategies as st

from libtarpit import control, smtp
from libtarpit.config import DEFAULTS, load_config
from libtarpit.session import (Close, Exec, Lists, LocalError, Log, PHASES, TRANSITIONS, SendBackend, SendClient,
                               Session, Sleep, StartBackend, classify)
from libtarpit.sleep import Outcome, SleepResult

NORMAL = classify("192.0.2.1", "mail.example.org", relayclient=False, verdict=None, key="192.0.2.0/24")
SUSPICIOUS = NORMAL._replace(cls="suspicious", rule=1, host="p1-2.dyn.example.net")
BANNER = b"220 backend ESMTP\r\n"
EHLO_REPLY = b"250-backend\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"


def sent_client(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendClient))


def sent_backend(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendBackend))


def events(actions) -> list[str]:
    """The log events, with the Close's end line last, as the driver writes them."""
    return [a.event for a in actions if isinstance(a, Log)] + ["end" for a in actions if isinstance(a, Close)]


def closed(actions) -> Close:
    [c] = [a for a in actions if isinstance(a, Close)]
    return c


def started(policy, lists=Lists(), client=SUSPICIOUS, greylist=None) -> Session:
    s = Session(client, policy, lists, greylist, 1000.0, proxy=True)
    acts = s.start()
    if any(isinstance(a, Sleep) for a in acts):
        acts = s.sleep_done(SleepResult(Outcome.ELAPSED, policy.greet_pause), 1001.0)
    assert any(isinstance(a, StartBackend) for a in acts)
    assert sent_client(s.backend_data(BANNER, 1001.0)) == BANNER
    return s


def make_lists(tmp_path, **files) -> Lists:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return Lists(control.ControlList.load(str(tmp_path), "badheloarg"),
                 control.ControlList.load(str(tmp_path), "rcptusers"))


SUSP = DEFAULTS["suspicious"]._replace(greylist="off", tarpit=65.0)


def test_phase_table_names_only_known_phases():
    for (src, _event), dst in TRANSITIONS.items():
        assert src in PHASES and dst in PHASES


def test_a_session_told_to_exec_execs():
    s = Session(NORMAL, DEFAULTS["normal"], Lists(), None, 0.0, proxy=False)
    acts = s.start()
    assert events(acts) == ["connect", "exec"]
    assert isinstance(acts[-1], Exec)


def test_greet_pause_then_exec_and_pregreet_554():
    pol = DEFAULTS["normal"]._replace(greet_pause=5.0)
    s = Session(NORMAL, pol, Lists(), None, 0.0, proxy=False)
    assert [a for a in s.start() if isinstance(a, Sleep)] == [Sleep(5.0, "greet")]
    assert isinstance(s.sleep_done(SleepResult(Outcome.ELAPSED, 5.0), 5.0)[-1], Exec)

    s = Session(NORMAL, pol, Lists(), None, 0.0, proxy=False)
    s.start()
    acts = s.sleep_done(SleepResult(Outcome.ELAPSED, 5.0, b"EHLO x\r\n", 0.5), 5.0)
    assert sent_client(acts).startswith(b"554 ")
    assert isinstance(acts[-1], Close) and "pregreet" in events(acts)


def test_pregreet_in_warn_mode_replays_the_early_bytes_to_the_backend():
    pol = load_config({"TARPIT_MODE": "warn", "GREETDELAY": "2"}).policy("normal")
    s = Session(NORMAL, pol, Lists(), None, 0.0, proxy=False)
    s.start()
    acts = s.sleep_done(SleepResult(Outcome.ELAPSED, 2.0, b"EHLO x\r\n", 0.5), 2.0)
    assert [a for a in acts if isinstance(a, Log) and a.event == "pregreet"][0].fields[0] == ("mode", "warn")
    assert any(isinstance(a, StartBackend) for a in acts)
    acts = s.backend_data(BANNER, 2.0)
    assert sent_backend(acts) == b"EHLO x\r\n"


def test_pipelining_hidden_from_suspicious_ehlo():
    s = started(SUSP)
    assert sent_backend(s.client_data(b"EHLO bot.example\r\n", 1.0)) == b"EHLO bot.example\r\n"
    out = sent_client(s.backend_data(EHLO_REPLY, 1.0))
    assert out == b"250-backend\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"
    last_line = b"250-backend\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
    s.client_data(b"EHLO again.example\r\n", 1.0)
    assert sent_client(s.backend_data(last_line, 1.0)) == b"250-backend\r\n250 8BITMIME\r\n"


def test_tarpit_holds_rcpt_and_a_disconnect_ends_everything():
    s = started(SUSP)
    s.client_data(b"HELO bot.example\r\n", 1.0)
    s.backend_data(b"250 hi\r\n", 1.0)
    s.client_data(b"MAIL FROM:<a@b.example>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    acts = s.client_data(b"RCPT TO:<bob@example.com>\r\n", 2.0)
    assert [a for a in acts if isinstance(a, Sleep)] == [Sleep(65.0, "rcpt")]
    assert sent_backend(acts) == b"", "the RCPT waits for the tarpit"
    acts = s.sleep_done(SleepResult(Outcome.DISCONNECTED, 31.4), 33.4)
    assert events(acts) == ["tarpit_lost", "end"]
    lost = dict(acts[0].fields)
    assert lost == {"stage": "rcpt", "elapsed": 31.4}
    assert closed(acts).reason == "tarpit_lost" and closed(acts).linger == 0, "nothing in flight: stop at once"
    assert s.phase == "closed"


def test_tarpit_survivor_is_relayed_and_early_bytes_logged_then_replayed_in_order():
    s = started(SUSP)
    s.client_data(b"HELO bot.example\r\n", 1.0)
    s.backend_data(b"250 hi\r\n", 1.0)
    acts = s.client_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.com>\r\n", 2.0)
    assert sent_backend(acts) == b"MAIL FROM:<a@b.example>\r\n", "RCPT waits for the MAIL reply"
    acts = s.backend_data(b"250 ok\r\n", 2.0)
    assert [a for a in acts if isinstance(a, Sleep)] == [Sleep(65.0, "rcpt")]
    acts = s.sleep_done(SleepResult(Outcome.ELAPSED, 65.0, b"DATA\r\n", 12.0), 67.0)
    assert "tarpit_done" in events(acts) and "pipelining" in events(acts)
    assert sent_backend(acts) == b"RCPT TO:<bob@example.com>\r\nDATA\r\n"
    out = sent_client(s.backend_data(b"250 ok\r\n354 go\r\n", 67.0))
    assert out == b"250 ok\r\n354 go\r\n"
    assert s.phase == "data_body"
    s.client_data(b"RCPT TO:<again@example.com>\r\n", 68.0)
    assert s._tarpitted, "once per connection"


def test_local_refusals_keep_reply_order_with_pipelined_commands(tmp_path):
    lists = make_lists(tmp_path, rcptusers="bob\n")
    s = started(DEFAULTS["normal"], lists, client=NORMAL)
    acts = s.client_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<eve@example.com>\r\n"
                         b"RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\n", 2.0)
    assert sent_backend(acts) == b"MAIL FROM:<a@b.example>\r\n", "the transaction is the backend's word"
    acts = s.backend_data(b"250 sender ok\r\n", 2.0)
    assert sent_backend(acts) == b"RCPT TO:<bob@example.com>\r\n"
    out = sent_client(acts)
    assert out.startswith(b"250 sender ok\r\n550 5.1.1 <eve@example.com>")
    out = sent_client(s.backend_data(b"250 rcpt ok\r\n", 2.0))
    assert out.startswith(b"250 rcpt ok\r\n550 5.1.1 <carol@example.com>"), "replies stay in command order"


def test_helo_refused_and_warn_mode_only_logs(tmp_path):
    lists = make_lists(tmp_path, badheloarg="localhost\n")
    s = started(DEFAULTS["normal"], lists, client=NORMAL)
    acts = s.client_data(b"HELO localhost\r\n", 1.0)
    assert sent_client(acts).startswith(b"553 ") and sent_backend(acts) == b""
    warn = load_config({"TARPIT_MODE": "warn"}).policy("normal")
    s = started(warn, lists, client=NORMAL)
    acts = s.client_data(b"HELO localhost\r\n", 1.0)
    assert sent_backend(acts) == b"HELO localhost\r\n"
    [log] = [a for a in acts if isinstance(a, Log)]
    assert log.event == "helo_reject" and ("mode", "warn") in log.fields


def test_drop_action_closes_after_554(tmp_path):
    lists = make_lists(tmp_path, badheloarg="localhost\n")
    pol = DEFAULTS["normal"]._replace(helo="drop")
    s = started(pol, lists, client=NORMAL)
    acts = s.client_data(b"HELO localhost\r\n", 1.0)
    assert sent_client(acts).startswith(b"554 ") and isinstance(acts[-1], Close)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8, 13])
def test_message_bytes_pass_unchanged_whatever_the_chunking(cut):
    body = b"Subject: x\r\n\r\n.dot\r\n..\r\nend\r\n.\r\n"
    s = started(DEFAULTS["normal"], client=NORMAL, lists=Lists(None, None))
    s.client_data(b"DATA\r\n", 1.0)
    s.backend_data(b"354 go\r\n", 1.0)
    got = b""
    for i in range(0, len(body), cut):
        got += sent_backend(s.client_data(body[i:i + cut], 1.0))
    assert got == body
    assert s.phase == "command"
    assert sent_client(s.backend_data(b"250 queued\r\n", 1.0)) == b"250 queued\r\n"


def test_bdat_chunks_pass_unchanged_when_the_backend_offers_chunking(tmp_path):
    lists = make_lists(tmp_path, rcptusers="bob\n")
    s = started(DEFAULTS["normal"], lists, client=NORMAL)
    s.client_data(b"EHLO x.example\r\n", 1.0)
    s.backend_data(b"250-backend\r\n250-CHUNKING\r\n250 8BITMIME\r\n", 1.0)
    s.client_data(b"MAIL FROM:<a@b.example>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    s.client_data(b"RCPT TO:<bob@example.com>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    chunk = b"RCPT TO:<eve@example.com>\r\n"
    acts = s.client_data(b"BDAT %d\r\n" % len(chunk) + chunk + b"BDAT 0 LAST\r\nNOOP\r\n", 1.0)
    assert sent_backend(acts) == b"BDAT %d\r\n" % len(chunk) + chunk, "the next BDAT waits for this one's reply"
    assert "rcpt_reject" not in events(acts), "chunk bytes are message data"
    acts = s.backend_data(b"250 chunk ok\r\n", 1.0)
    assert sent_backend(acts) == b"BDAT 0 LAST\r\n"
    assert sent_backend(s.backend_data(b"250 queued\r\n", 1.0)) == b"NOOP\r\n"


def test_bdat_to_a_backend_without_chunking_cannot_smuggle_commands(tmp_path):
    lists = make_lists(tmp_path, rcptusers="bob\n")
    s = started(DEFAULTS["normal"], lists, client=NORMAL)
    s.client_data(b"EHLO x.example\r\n", 1.0)
    s.backend_data(b"250-backend\r\n250 8BITMIME\r\n", 1.0)
    s.client_data(b"MAIL FROM:<a@b>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    s.client_data(b"RCPT TO:<bob@example.com>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    chunk = b"RCPT TO:<eve@example.com>\r\n"
    acts = s.client_data(b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\n", 1.0)
    assert sent_backend(acts) == b"NOOP\r\n", "neither the BDAT nor its chunk reach the backend"
    assert sent_client(acts).startswith(b"503 "), "no CHUNKING offered: refused here"


def test_bare_lf_dot_does_not_end_the_message():
    s = started(DEFAULTS["normal"], client=NORMAL)
    s.client_data(b"DATA\r\n", 1.0)
    s.backend_data(b"354 go\r\n", 1.0)
    body = b"hello\n.\nRCPT TO:<smuggled@example.com>\r\n"
    assert sent_backend(s.client_data(body, 1.0)) == body
    assert s.phase == "data_body"
    assert sent_backend(s.client_data(b"\r\n.\r\n", 1.0)) == b"\r\n.\r\n"
    assert s.phase == "command"


def test_replies_owed_after_the_client_half_closes_still_go_out():
    s = started(DEFAULTS["normal"], client=NORMAL)
    s.client_data(b"DATA\r\n", 1.0)
    s.backend_data(b"354 go\r\n", 1.0)
    s.client_data(b"x\r\n.\r\nQUIT\r\n", 1.0)
    assert s.client_data(b"", 1.0) == [] and not s.wants_client()
    acts = s.backend_data(b"250 queued\r\n", 1.0)
    assert sent_backend(acts) == b"QUIT\r\n", "the QUIT sent before the half-close goes on"
    acts += s.backend_data(b"221 bye\r\n", 1.0)
    assert sent_client(acts) == b"250 queued\r\n221 bye\r\n"
    assert closed(acts).reason == "client_closed" and closed(acts).linger > 0


def test_backend_gone_before_its_banner_gives_421():
    s = Session(NORMAL, DEFAULTS["normal"], Lists(), None, 0.0, proxy=True)
    s.start()
    acts = s.backend_data(b"", 0.1)
    assert sent_client(acts).startswith(b"421 4.3.0") and "error" in events(acts)


def test_ehlo_rebuilt_with_crlf_on_every_line():
    s = started(SUSP)
    s.client_data(b"EHLO bot.example\r\n", 1.0)
    out = sent_client(s.backend_data(b"250-backend\r\n250-PIPELINING\r\n250-PIPECONNECT\r\n250\r\n", 1.0))
    assert out == b"250-backend\r\n250 \r\n"


def test_past_the_soft_limit_commands_wait_for_owed_replies(tmp_path):
    lists = make_lists(tmp_path, rcptusers="bob\n")
    pol = DEFAULTS["normal"]._replace(error_soft_limit=1, error_sleep=0)
    s = started(pol, lists, client=NORMAL)
    s.client_data(b"MAIL FROM:<a@b>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    acts = s.client_data(b"RCPT TO:<x@y>\r\nNOOP\r\nNOOP\r\n", 1.0)
    assert sent_backend(acts) == b"NOOP\r\n", "one command in flight once errors pile up"
    assert sent_backend(s.backend_data(b"250 ok\r\n", 1.0)) == b"NOOP\r\n"


def test_error_hard_limit_drops_with_421(tmp_path):
    lists = make_lists(tmp_path, badheloarg="localhost\n")
    pol = DEFAULTS["normal"]._replace(error_hard_limit=2, error_sleep=0)
    s = started(pol, lists, client=NORMAL)
    acts = s.client_data(b"HELO localhost\r\nHELO localhost\r\n", 1.0)
    out = sent_client(acts)
    assert out.count(b"553 ") == 2 and out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert closed(acts).reason == "too_many_errors"


def test_error_sleep_after_soft_limit(tmp_path):
    lists = make_lists(tmp_path, badheloarg="localhost\n")
    pol = DEFAULTS["normal"]._replace(error_soft_limit=1, error_sleep=2.0)
    s = started(pol, lists, client=NORMAL)
    s.client_data(b"HELO localhost\r\n", 1.0)
    acts = s.client_data(b"HELO mail.example.org\r\n", 1.0)
    assert [a for a in acts if isinstance(a, Sleep)] == [Sleep(2.0, "error")]
    acts = s.sleep_done(SleepResult(Outcome.ELAPSED, 2.0), 3.0)
    assert sent_backend(acts) == b"HELO mail.example.org\r\n"


def test_recipient_limit():
    pol = DEFAULTS["normal"]._replace(recipient_limit=1)
    s = started(pol, client=NORMAL)
    acts = s.client_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nRCPT TO:<z@y.example>\r\n", 1.0)
    assert sent_backend(acts) == b"MAIL FROM:<a@b.example>\r\n"
    acts = s.backend_data(b"250 ok\r\n", 1.0)
    assert sent_backend(acts) == b"RCPT TO:<x@y.example>\r\n"
    out = sent_client(acts) + sent_client(s.backend_data(b"250 ok\r\n", 1.0))
    assert out == b"250 ok\r\n250 ok\r\n452 4.5.3 Too many recipients\r\n"


def test_timeout_and_backend_close():
    s = started(DEFAULTS["normal"], client=NORMAL)
    assert s.deadline() == 1000.0 + 300, "idle time counts from the client's last word"
    acts = s.timeout(1400.0)
    assert sent_client(acts).startswith(b"421 4.4.2") and isinstance(acts[-1], Close)
    s = started(DEFAULTS["normal"], client=NORMAL)
    acts = s.backend_data(b"", 2.0)
    assert closed(acts).reason == "backend_closed"
    assert sent_client(acts) == b"421 4.3.0 Service not available, closing connection\r\n", \
        "a backend that dies in mid-session leaves the client a reply"


def test_fail_answers_451_and_logs_one_error():
    s = started(DEFAULTS["normal"], client=NORMAL)
    acts = s.fail("internal", "boom")
    assert sent_client(acts).startswith(b"451 ") and events(acts) == ["error", "end"]
    assert acts[-1].status == 111


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_any_client_bytes_never_raise_and_reach_the_backend_or_a_reply(chunks):
    s = started(SUSP)
    for c in chunks:
        for a in s.client_data(c, 5.0):
            if isinstance(a, Sleep):
                s.sleep_done(SleepResult(Outcome.ELAPSED, a.seconds), 6.0)
        if s.phase == "closed":
            break


def test_classify_order():
    from libtarpit.s25r import Verdict

    bad = Verdict(rule=1, allowed_by=None)
    assert classify("1.2.3.4", "x", relayclient=True, verdict=bad).cls == "trusted"
    assert classify("1.2.3.4", "x", relayclient=False, verdict=bad).cls == "suspicious"
    assert classify("1.2.3.4", "x", relayclient=False, verdict=Verdict(1, ".google.com")).cls == "trusted"
    assert classify("1.2.3.4", "x", relayclient=True, verdict=bad, force_class="suspicious").cls == "suspicious"


def test_reply_builders():
    assert smtp.reply(250, "a", "b") == b"250-a\r\n250 b\r\n"
    assert smtp.mail_path("FROM:<> SIZE=10") == ""
    assert smtp.mail_path("TO:<Bob@Example.com>") == "Bob@Example.com"
    assert smtp.mail_path("garbage") is None
    assert smtp.printable(b"\x00a\xffb" + b"c" * 200).startswith("?a?b")


def test_idle_timeout_does_not_cut_off_a_slow_backend_reply():
    s = started(DEFAULTS["normal"]._replace(idle_timeout=60), client=NORMAL)
    assert s.deadline() == 1000.0 + 60
    s.client_data(b"DATA\r\n", 1010.0)
    assert s.deadline() >= 1010.0 + 3600, "the backend owes the 354"
    s.backend_data(b"354 go\r\n", 1011.0)
    assert s.deadline() == 1010.0 + 60, "now it is the client's turn again"


def test_drop_actions_for_pregreet_and_tarpit():
    pol = DEFAULTS["normal"]._replace(greet_pause=1.0, pregreet="drop")
    s = Session(NORMAL, pol, Lists(), None, 0.0, proxy=False)
    s.start()
    acts = s.sleep_done(SleepResult(Outcome.ELAPSED, 1.0, b"EHLO x\r\n", 0.1), 1.0)
    assert sent_client(acts) == b"", "drop hangs up without a word"
    assert closed(acts).reason == "pregreet" and events(acts) == ["pregreet", "end"]

    s = started(SUSP._replace(tarpit_action="drop"))
    acts = s.client_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", 1.0)
    assert not [a for a in acts if isinstance(a, Sleep)], "drop does not hold the client"
    out = sent_client(s.backend_data(b"250 ok\r\n", 1.0))
    assert out == b"250 ok\r\n554 5.7.1 Connection refused by policy\r\n"


def test_a_delivered_message_resets_the_error_counter(tmp_path):
    lists = make_lists(tmp_path, badheloarg="localhost\n")
    s = started(DEFAULTS["normal"], lists, client=NORMAL)
    s.client_data(b"HELO localhost\r\nHELO localhost\r\n", 1.0)
    assert s.errors == 2
    s.client_data(b"DATA\r\n", 1.0)
    s.backend_data(b"354 go\r\n", 1.0)
    s.client_data(b"x\r\n.\r\n", 1.0)
    s.backend_data(b"250 queued\r\n", 1.0)
    assert s.errors == 0


# --- the transaction follows the backend (issue 10) -------------------------------------


def opened(policy=SUSP, lists=Lists(), client=SUSPICIOUS) -> Session:
    """A session past EHLO and a MAIL the backend accepted."""
    s = started(policy, lists, client)
    s.client_data(b"EHLO client.example\r\n", 1.0)
    s.backend_data(b"250-backend\r\n250 8BITMIME\r\n", 1.0)
    s.client_data(b"MAIL FROM:<a@b.example>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    return s


@pytest.mark.parametrize("line", [b"RSET x\r\n", b"RSET \xff\r\n", b"DATA now\r\n", b"QUIT please\r\n"])
def test_argumentless_commands_with_an_argument_are_refused_here(line):
    s = opened(SUSP._replace(tarpit=0.0))
    acts = s.client_data(line, 2.0)
    assert sent_client(acts).startswith(b"501 ") and sent_backend(acts) == b""
    acts = s.client_data(b"RCPT TO:<bob@example.com>\r\n", 2.0)
    assert sent_backend(acts) == b"RCPT TO:<bob@example.com>\r\n", "the transaction is still the backend's"


@pytest.mark.parametrize("arg", [b"TO:<nosuchuser@example.org", b"<nosuchuser@example.org>",
                                 b"TO:alice@example.org <nosuchuser@example.org>", b"TO:<a@b>\x00<c@d>"])
def test_rcpt_spellings_backends_read_differently_never_reach_the_backend(arg, tmp_path):
    s = opened(SUSP._replace(tarpit=0.0), make_lists(tmp_path, rcptusers="alice\n"))
    acts = s.client_data(b"RCPT " + arg + b"\r\n", 2.0)
    assert sent_backend(acts) == b"" and sent_client(acts).startswith(b"501 ")


def test_a_nested_mail_the_backend_refuses_keeps_the_recipient_count():
    s = opened(SUSP._replace(tarpit=0.0, recipient_limit=2))
    for rcpt in (b"a", b"b"):
        s.client_data(b"RCPT TO:<" + rcpt + b"@example.com>\r\n", 2.0)
        s.backend_data(b"250 ok\r\n", 2.0)
    s.client_data(b"MAIL FROM:<c@d.example>\r\n", 2.0)
    s.backend_data(b"503 nested MAIL command\r\n", 2.0)
    acts = s.client_data(b"RCPT TO:<c@example.com>\r\n", 2.0)
    assert sent_client(acts) == b"452 4.5.3 Too many recipients\r\n" and sent_backend(acts) == b""


def test_rcpt_without_a_confirmed_transaction_is_refused_here():
    s = started(SUSP._replace(tarpit=0.0))
    s.client_data(b"MAIL FROM:<a@b.example>\r\n", 1.0)
    s.backend_data(b"503 send HELO first\r\n", 1.0)
    acts = s.client_data(b"RCPT TO:<bob@example.com>\r\n", 1.0)
    assert sent_client(acts).startswith(b"503 5.5.1") and sent_backend(acts) == b""


def test_the_tarpit_runs_once_per_connection():
    s = opened()
    s.client_data(b"RCPT TO:<bob@example.com>\r\n", 2.0)
    s.sleep_done(SleepResult(Outcome.ELAPSED, 65.0), 67.0)
    s.backend_data(b"250 ok\r\n", 67.0)
    s.client_data(b"RSET\r\n", 67.0)
    s.backend_data(b"250 reset\r\n", 67.0)
    s.client_data(b"MAIL FROM:<a@b.example>\r\n", 67.0)
    s.backend_data(b"250 ok\r\n", 67.0)
    acts = s.client_data(b"RCPT TO:<carol@example.com>\r\n", 68.0)
    assert not [a for a in acts if isinstance(a, Sleep)], "no second tarpit"
    assert sent_backend(acts) == b"RCPT TO:<carol@example.com>\r\n"


def test_taRgrey_with_no_tarpit_passes_and_says_so():
    class Tarpit:
        calls = []

        def check(self, *a, **k):
            from libtarpit.greylist import Decision
            return Decision("tarpit", "first_contact")

        def __getattr__(self, name):
            return lambda *a: self.calls.append(name)

    gl = Tarpit()
    s = opened(DEFAULTS["suspicious"]._replace(tarpit=0.0), client=SUSPICIOUS)
    s.greylist = gl
    acts = s.client_data(b"RCPT TO:<bob@example.com>\r\n", 2.0)
    assert [dict(a.fields) for a in acts if isinstance(a, Log)] == [{"reason": "no_tarpit"}]
    assert sent_backend(acts) == b"RCPT TO:<bob@example.com>\r\n" and gl.calls == []


# --- STARTTLS and AUTH (issue 11) ---------------------------------------------------------


def test_starttls_terminated_here_drops_injected_plaintext():
    from libtarpit.session import StartTLS

    s = Session(SUSPICIOUS, SUSP, Lists(), None, 0.0, proxy=True, tls=True)
    s.start()
    s.backend_data(BANNER, 0.0)
    s.client_data(b"EHLO client.example\r\n", 1.0)
    ehlo = sent_client(s.backend_data(b"250-backend\r\n250-STARTTLS\r\n250 8BITMIME\r\n", 1.0))
    assert ehlo == b"250-backend\r\n250-8BITMIME\r\n250 STARTTLS\r\n", "our STARTTLS, not the backend's"
    acts = s.client_data(b"STARTTLS\r\nRSET\r\n", 1.0)
    assert acts[-1] == StartTLS(b"220 2.0.0 Ready to start TLS\r\n") and sent_backend(acts) == b""
    assert "tls_injection" in events(acts)
    acts = s.tls_done(True, "TLSv1.3", 1.5)
    assert events(acts) == ["tls"] and sent_backend(acts) == b"", "the RSET never runs"
    acts = s.client_data(b"EHLO client.example\r\n", 2.0)
    assert sent_backend(acts) == b"EHLO client.example\r\n"
    ehlo = sent_client(s.backend_data(b"250-backend\r\n250-STARTTLS\r\n250 8BITMIME\r\n", 2.0))
    assert b"STARTTLS" not in ehlo
    assert ("tls", 1) in closed(s.client_data(b"", 3.0)).fields


def tls_session() -> Session:
    s = Session(SUSPICIOUS, SUSP._replace(tarpit=0.0), Lists(), None, 0.0, proxy=True, tls=True)
    s.start()
    s.backend_data(BANNER, 0.0)
    return s


def test_starttls_waits_for_the_replies_owed_before_it():
    from libtarpit.session import StartTLS

    s = tls_session()
    acts = s.client_data(b"NOOP\r\nSTARTTLS\r\n", 1.0)
    assert sent_backend(acts) == b"NOOP\r\n" and not [a for a in acts if isinstance(a, StartTLS)]
    acts = s.backend_data(b"250 ok\r\n", 1.0)
    assert sent_client(acts) == b"250 ok\r\n" and isinstance(acts[-1], StartTLS), "the NOOP's reply goes first"


def test_a_certificate_that_does_not_load_answers_454_and_plaintext_goes_on():
    s = tls_session()
    s.client_data(b"STARTTLS\r\n", 1.0)
    acts = s.tls_done(False, "certificate: /etc/cert.pem: no PEM certificate in the file", 1.0)
    assert sent_client(acts).startswith(b"454 4.7.0") and "error" in events(acts)
    assert s.phase == "command" and not s.tls
    s.client_data(b"EHLO client.example\r\n", 2.0)
    ehlo = sent_client(s.backend_data(b"250-backend\r\n250-STARTTLS\r\n250 8BITMIME\r\n", 2.0))
    assert b"STARTTLS" not in ehlo, "no offer we cannot keep"


def test_starttls_passed_through_after_the_tarpit_then_bytes_only():
    from libtarpit.session import Passthrough

    s = started(SUSP)
    acts = s.client_data(b"STARTTLS\r\n", 1.0)
    assert [a for a in acts if isinstance(a, Sleep)] == [Sleep(65.0, "tls")], "bots meet the tarpit first"
    acts = s.sleep_done(SleepResult(Outcome.ELAPSED, 65.0), 66.0)
    assert sent_backend(acts) == b"STARTTLS\r\n"
    acts = s.backend_data(b"220 go ahead\r\n", 66.0)
    assert isinstance(acts[-1], Passthrough) and "tls_passthrough" in events(acts)
    assert s.deadline() is None and not s.wants_client()


def test_auth_is_opaque_and_235_skips_the_tarpit_and_rcptusers(tmp_path):
    s = opened(lists=make_lists(tmp_path, rcptusers="bob\n"))
    secret = b"AGFsaWNlAHMzY3JldA=="
    s.client_data(b"RSET\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    acts = s.client_data(b"AUTH PLAIN\r\n" + secret + b"\r\n", 1.0)
    assert sent_backend(acts) == b"AUTH PLAIN\r\n", "the answer waits for the challenge"
    acts = s.backend_data(b"334 \r\n", 1.0)
    assert sent_backend(acts) == secret + b"\r\n"
    acts = s.backend_data(b"235 2.7.0 ok\r\n", 1.0)
    assert [dict(a.fields) for a in acts if isinstance(a, Log)] == [{"mech": "PLAIN", "result": "ok"}]
    s.client_data(b"MAIL FROM:<alice@example.com>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    acts = s.client_data(b"RCPT TO:<carol@remote.example>\r\n", 1.0)
    assert sent_backend(acts) == b"RCPT TO:<carol@remote.example>\r\n"
    assert not [a for a in acts if isinstance(a, Sleep)]
    every = repr([a for a in acts if isinstance(a, Log)])
    assert "s3cret" not in every and secret.decode() not in every


def test_failed_auth_counts_as_an_error_up_to_the_hard_limit():
    s = started(SUSP._replace(error_hard_limit=2, error_sleep=0))
    for _ in range(2):
        s.client_data(b"AUTH PLAIN Zm9v\r\n", 1.0)
        acts = s.backend_data(b"535 5.7.8 no\r\n", 1.0)
    assert sent_client(acts).endswith(b"421 4.7.0 Too many errors, closing connection\r\n")


# --- limits against trickle ---------------------------------------------------------------


def test_session_limit_and_minimum_data_rate():
    s = started(SUSP._replace(session_limit=600.0))
    assert s.deadline() <= 1000.0 + 600
    assert closed(s.timeout(1600.0)).reason == "session_limit"
    s = opened(SUSP._replace(tarpit=0.0, min_data_rate=100))
    s.client_data(b"RCPT TO:<bob@example.com>\r\n", 2.0)
    s.backend_data(b"250 ok\r\n", 2.0)
    s.client_data(b"DATA\r\n", 2.0)
    s.backend_data(b"354 go\r\n", 2.0)
    for t in range(4, 40, 2):
        acts = s.client_data(b"x", float(t))
        if s.phase == "closed":
            break
    assert t >= 32, "not before the grace period"
    assert closed(acts).reason == "slow_data" and sent_client(acts).startswith(b"421 ")


# --- every command gets exactly one reply, in order, and the session ends -----------------


def model_backend(s: Session, acts, now: float) -> list:
    """Answer what the session sent the way a simple SMTP server would, until it is quiet."""
    out, pending = [], list(acts)
    body = False
    buf = b""
    while pending:
        data = sent_backend(pending)
        out += pending
        pending = []
        buf += data
        replies = b""
        while True:
            if body:
                end = buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                buf, body = buf[end + 5:], False
                replies += b"250 queued\r\n"
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl + 1], buf[nl + 1:]
            verb = line[:4].upper()
            if verb == b"DATA":
                replies += b"354 go\r\n"
                body = True
            elif verb == b"QUIT":
                replies += b"221 bye\r\n"
            else:
                replies += b"250 ok\r\n"
        if replies and s.phase != "closed":
            pending = s.backend_data(replies, now)
    return out


COMMANDS = st.sampled_from([b"EHLO a.example", b"HELO b.example", b"MAIL FROM:<x@y.example>",
                            b"RCPT TO:<bob@example.com>", b"RCPT TO:<eve@example.com>", b"RSET", b"NOOP",
                            b"RSET x", b"RCPT <eve@example.com>", b"MAIL FROM:x", b"VRFY bob", b"\x00\xff",
                            b"BDAT 0 LAST", b"STARTTLS x", b"AUTH", b""])


@settings(max_examples=150, deadline=None)
@given(st.lists(COMMANDS, min_size=1, max_size=15), st.integers(1, 40))
def test_every_command_gets_exactly_one_reply_in_order_and_the_session_ends(commands, cut):
    pol = DEFAULTS["normal"]._replace(error_sleep=0, error_hard_limit=1000)
    s = started(pol, client=NORMAL)
    stream = b"".join(c + b"\r\n" for c in commands)
    acts = []
    for i in range(0, len(stream), cut):
        acts += model_backend(s, s.client_data(stream[i:i + cut], 2.0), 2.0)
    acts += model_backend(s, s.client_data(b"QUIT\r\n", 3.0), 3.0)
    acts += model_backend(s, s.backend_data(b"", 4.0), 4.0)
    replies = [ln for ln in sent_client(acts).split(b"\r\n") if ln[3:4] in (b" ", b"")and ln]
    assert len(replies) == len(commands) + 1, (commands, replies)
    assert replies[-1].startswith(b"221"), "the QUIT's reply comes last: replies keep command order"
    assert s.phase == "closed"


def test_passthrough_tarpit_before_starttls_is_skipped_for_a_client_taRgrey_knows():
    class Known:
        def check(self, client, sender, rcpt, now, suspicious=True):
            from libtarpit.greylist import Decision
            assert (sender, rcpt) == ("", ""), "before STARTTLS there is no envelope"
            return Decision("pass", "sat_through")

    s = Session(SUSPICIOUS, DEFAULTS["suspicious"], Lists(), Known(), 0.0, proxy=True)
    s.start()
    s.backend_data(BANNER, 0.0)
    acts = s.client_data(b"STARTTLS\r\n", 1.0)
    assert not [a for a in acts if isinstance(a, Sleep)] and sent_backend(acts) == b"STARTTLS\r\n"
    assert [dict(a.fields) for a in acts if isinstance(a, Log)] == [{"reason": "sat_through"}]


def test_client_bytes_fed_during_a_sleep_are_a_driver_bug():
    s = started(SUSP)
    s.client_data(b"MAIL FROM:<a@b.example>\r\n", 1.0)
    s.backend_data(b"250 ok\r\n", 1.0)
    s.client_data(b"RCPT TO:<bob@example.com>\r\n", 1.0)
    assert s.phase == "sleeping"
    with pytest.raises(LocalError):
        s.client_data(b"", 2.0)


def test_a_half_closed_client_whose_replies_start_the_error_pause_is_not_closed_under_the_sleep():
    pol = DEFAULTS["normal"]._replace(error_soft_limit=1, error_sleep=2.0)
    s = started(pol, client=NORMAL)
    s.client_data(b"NOOP\r\n", 1.0)
    s.backend_data(b"550 no\r\n", 1.0)  # at the soft limit now
    assert [a for a in s.client_data(b"NOOP\r\nNOOP\r\n", 1.0) if isinstance(a, Sleep)]
    assert sent_backend(s.sleep_done(SleepResult(Outcome.ELAPSED, 2.0), 3.0)) == b"NOOP\r\n"
    s.client_data(b"", 3.0)  # half-close: a reply is still owed, one NOOP still buffered
    acts = s.backend_data(b"550 no\r\n", 3.0)
    assert [a for a in acts if isinstance(a, Sleep)] == [Sleep(2.0, "error")]
    assert not [a for a in acts if isinstance(a, Close)], "no Close behind a pending Sleep"
    acts = s.sleep_done(SleepResult(Outcome.DISCONNECTED, 0.1), 1.1)
    assert closed(acts).reason == "client_closed"


def test_the_end_line_counts_the_messages_the_backend_accepted():
    """msgs= on the end line: what `tarpitctl stats` reads to know a suspicious client delivered."""
    s = started(DEFAULTS["normal"], client=NORMAL)
    for line, reply in ((b"EHLO a.example\r\n", b"250 ok\r\n"), (b"MAIL FROM:<a@example.org>\r\n", b"250 ok\r\n"),
                        (b"RCPT TO:<bob@example.com>\r\n", b"250 ok\r\n"), (b"DATA\r\n", b"354 go\r\n"),
                        (b"hi\r\n.\r\n", b"250 queued\r\n"), (b"MAIL FROM:<a@example.org>\r\n", b"250 ok\r\n"),
                        (b"RCPT TO:<bob@example.com>\r\n", b"250 ok\r\n"), (b"DATA\r\n", b"354 go\r\n"),
                        (b"again\r\n.\r\n", b"554 no\r\n")):
        s.client_data(line, 1.0)
        s.backend_data(reply, 1.0)
    assert ("msgs", 1) in closed(s.client_data(b"", 2.0)).fields, "one accepted, one refused"
