"""End to end: real tcpserver -> tarpit-smtpd -> tarpit-sink, clients from loopback addresses."""

from __future__ import annotations

import os
import signal
import socket
import smtplib
import subprocess
import time

import pytest

from conftest import children_of, cmdline, need, recv_reply

GOOD, BOT, TRUSTED, PAUSED = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"

RULES = f"""
{GOOD}:allow,TCPREMOTEHOST="mail.example.com"
{BOT}:allow,TCPREMOTEHOST="{DYNAMIC}",TARPIT="3",TARPIT_GREYLIST="off"
{TRUSTED}:allow,TCPREMOTEHOST="{DYNAMIC}",RELAYCLIENT=""
{PAUSED}:allow,TCPREMOTEHOST="mail.example.net",GREETDELAY="1"
"""

MESSAGE = (b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: byte test\r\n\r\n"
           b"line one\r\n.leading dot survives\r\n..two dots\r\n"
           b"8bit: \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\r\n" + b"x" * 900 + b"\r\n\r\n"
           b"last line without trailing blank\r\n")


def pid_for(server, ip: str) -> int:
    return int(server.wait_log(rf"tcpserver: pid (\d+) from {ip.replace('.', '[.]')}\n").group(1))


def smtp_from(server, src: str, timeout: float = 30) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.port, source_address=(src, 0), timeout=timeout)


def test_good_client_delivers_byte_for_byte_on_the_fast_path(tarpit_server):
    server = tarpit_server(RULES)
    with smtp_from(server, GOOD) as s:
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
    assert server.messages() == [MESSAGE]
    connect = server.events("connect")[0]
    assert connect["class"] == "normal" and connect["host"] == "mail.example.com"
    assert server.events("exec"), "a normal client with no lists takes the exec fast path"


def test_proxy_path_passes_every_byte_of_several_messages(tarpit_server):
    server = tarpit_server(RULES.replace('TARPIT="3"', 'TARPIT="1"'))
    second = MESSAGE.replace(b"byte test", b"second") + b".\r\n".join([b"a", b"b", b""])
    with smtp_from(server, BOT) as s:
        assert s.sendmail("x@example.org", ["bob@example.com", "carol@example.com"], MESSAGE) == {}
        assert s.sendmail("x@example.org", ["bob@example.com"], second) == {}
    assert sorted(server.messages()) == sorted([MESSAGE, second]), "each message once, byte for byte"
    assert [e["class"] for e in server.events("connect")] == ["suspicious"]
    assert server.events("tarpit_done")[0]["stage"] == "rcpt"
    assert len(server.events("tarpit_start")) == 1, "the tarpit runs once per connection"


def test_swaks_delivers_through_the_proxy_path(tarpit_server):
    need("swaks")
    server = tarpit_server(RULES.replace('TARPIT="3"', 'TARPIT="1"'))
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--local-interface", BOT,
         "--from", "s@example.org", "--to", "bob@example.com", "--header", "Subject: from swaks",
         "--body", "swaks body line"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "<-  250 2.0.0 Ok: queued as" in out.stdout
    [msg] = server.messages()
    assert b"Subject: from swaks" in msg and b"swaks body line" in msg


def test_trusted_client_takes_the_fast_path_no_wrapper_process_left(tarpit_server):
    server = tarpit_server(RULES)
    sock = server.connect(TRUSTED)
    assert recv_reply(sock).startswith(b"220 ")
    pid = pid_for(server, TRUSTED)
    line = cmdline(pid)
    # program names, not substrings: the venv's interpreter is /opt/tarpit-smtpd/bin/python
    programs = lambda cmd: [os.path.basename(w) for w in cmd.split()]
    assert "tarpit-sink" in programs(line) and "tarpit-smtpd" not in programs(line), line
    assert not [c for c in children_of(pid) if "tarpit-smtpd" in programs(cmdline(c))]
    sock.sendall(b"QUIT\r\n")
    assert recv_reply(sock).startswith(b"221")
    sock.close()
    assert server.events("connect")[0]["class"] == "trusted"


def test_bot_that_leaves_during_the_tarpit_ends_every_process(tarpit_server):
    server = tarpit_server(RULES.replace('TARPIT="3"', 'TARPIT="20"'))
    sock = server.connect(BOT)
    assert recv_reply(sock).startswith(b"220")
    sock.sendall(b"EHLO bot\r\n")
    ehlo = recv_reply(sock)
    assert b"PIPELINING" not in ehlo, "PIPELINING is hidden from suspicious clients"
    sock.sendall(b"MAIL FROM:<spam@example.org>\r\n")
    assert recv_reply(sock).startswith(b"250")
    pid = pid_for(server, BOT)
    procs = [pid] + children_of(pid)
    assert len(procs) >= 2, "wrapper and backend are running"
    sock.sendall(b"RCPT TO:<bob@example.com>\r\n")
    server.wait_log("event=tarpit_start")
    time.sleep(0.3)
    sock.close()
    closed = time.monotonic()
    server.wait_log(rf"tcpserver: end {pid} ")
    gone_after = time.monotonic() - closed
    # the 100 ms / p99 10 ms targets are measured in bench/; here a bound that cannot flake
    assert gone_after < 2.0, gone_after
    for p in procs:
        assert not os.path.exists(f"/proc/{p}") or "Z" in open(f"/proc/{p}/stat").read().split()[2]
    [lost] = server.events("tarpit_lost")
    assert 0.2 < float(lost["elapsed"]) < 2.0
    assert server.events("end")[-1]["reason"] == "tarpit_lost"


def test_pipelining_during_the_tarpit_is_logged_and_replies_stay_in_order(tarpit_server):
    server = tarpit_server(RULES.replace('TARPIT="3"', 'TARPIT="1"'))
    sock = server.connect(BOT)
    recv_reply(sock)
    sock.sendall(b"HELO bot.example.org\r\n")
    recv_reply(sock)
    sock.sendall(b"MAIL FROM:<x@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    got = b""
    while got.count(b"\r\n") < 3:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    codes = [ln[:3] for ln in got.split(b"\r\n") if ln]
    assert codes == [b"250", b"250", b"354"]
    sock.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert recv_reply(sock).startswith(b"250")
    sock.close()
    [pl] = server.wait_log("event=pipelining") and server.events("pipelining")
    assert pl["stage"] == "rcpt"
    assert server.messages() == [b"Subject: p\r\n\r\nbody\r\n"]


def test_client_talking_before_the_greeting_gets_554(tarpit_server):
    server = tarpit_server(RULES)
    sock = server.connect(PAUSED)
    sock.sendall(b"EHLO early.example.org\r\n")
    reply = recv_reply(sock)
    assert reply.startswith(b"554 ")
    assert sock.recv(100) == b"", "the connection is closed after 554"
    [ev] = server.events("pregreet")
    assert ev["bytes"] == str(len(b"EHLO early.example.org\r\n"))


def test_patient_client_gets_the_banner_after_the_greet_pause(tarpit_server):
    server = tarpit_server(RULES)
    t = time.monotonic()
    sock = server.connect(PAUSED)
    assert recv_reply(sock).startswith(b"220")
    assert time.monotonic() - t >= 0.9
    sock.close()


def test_client_leaving_during_the_greet_pause_is_logged_and_no_backend_starts(tarpit_server):
    server = tarpit_server(RULES.replace('GREETDELAY="1"', 'GREETDELAY="5"'))
    sock = server.connect(PAUSED)
    pid = pid_for(server, PAUSED)
    assert children_of(pid) == [], "no backend during the greet pause"
    time.sleep(0.2)
    sock.close()
    server.wait_log(rf"tcpserver: end {pid} ")
    [ev] = server.events("greet_lost")
    assert float(ev["elapsed"]) < 2.0


def test_badheloarg_refuses_listed_and_dotless_arguments(tarpit_server):
    rules = RULES.replace('"mail.example.com"', '"mail.example.com",TARPIT_ACTION_HELO_NODOT="enforce"')
    server = tarpit_server(rules, control_files={"badheloarg": "localhost.localdomain\nmx.example.com\n"})
    with smtp_from(server, GOOD) as s:
        assert s.ehlo("localhost.localdomain")[0] == 553
        assert s.helo("MX.example.com")[0] == 553
        assert s.ehlo("nodot")[0] == 553
        code, text = s.ehlo("[192.0.2.7]")
        assert code == 250
        assert b"PIPELINING" in text, "normal clients keep PIPELINING"
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
    reasons = [(e["helo"], e["reason"]) for e in server.events("helo_reject")]
    assert reasons == [("localhost.localdomain", "listed"), ("MX.example.com", "listed"), ("nodot", "nodot")]
    assert server.messages() == [MESSAGE]


def test_rcptusers_refuses_unknown_users_without_the_backend(tarpit_server):
    server = tarpit_server(RULES, control_files={"rcptusers": "bob\npostmaster\nlist-default\n"})
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.com")
        s.mail("a@example.org")
        code, text = s.rcpt("alice@example.com")
        assert code == 550 and text.startswith(b"5.1.1")
        assert s.rcpt("Bob@example.com")[0] == 250
        assert s.rcpt("list-announce@example.com")[0] == 250
        s.data(MESSAGE)
    assert [e["rcpt"] for e in server.events("rcpt_reject")] == ["alice@example.com"]
    assert server.messages() == [MESSAGE]


def test_compiled_cdb_list_is_used(tarpit_server, tmp_path):
    server = tarpit_server(RULES, control_files={"rcptusers": "bob\n"})
    subprocess.run(["tarpitctl", "cdb", str(server.control / "rcptusers")], check=True, capture_output=True)
    (server.control / "rcptusers").write_text("nobody-but-the-cdb-is-read\n")
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.com")
        s.mail("a@example.org")
        assert s.rcpt("bob@example.com")[0] == 250


def test_corrupt_control_file_gives_451_and_an_error_line(tarpit_server):
    server = tarpit_server(RULES)
    (server.control / "rcptusers.cdb").write_bytes(b"\x00garbage, not a cdb")
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtp_from(server, GOOD)
    assert e.value.smtp_code == 451
    [err] = server.wait_log("event=error") and server.events("error")
    assert err["what"] == "control" and "rcptusers" in err["detail"]
    assert "Traceback" not in server.log()


def test_backend_that_cannot_start_gives_451(tarpit_server):
    server = tarpit_server(RULES, command=["tarpit-smtpd", "/nonexistent/qmail-smtpd"])
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtp_from(server, BOT)
    assert e.value.smtp_code == 451
    assert server.events("error")[0]["what"] == "backend"


def test_backend_killed_mid_session_ends_the_client_connection(tarpit_server):
    server = tarpit_server(RULES, control_files={"badheloarg": "localhost\n"})
    sock = server.connect(GOOD)
    recv_reply(sock)
    sock.sendall(b"EHLO mail.example.com\r\n")
    recv_reply(sock)
    pid = pid_for(server, GOOD)
    [backend] = children_of(pid)
    os.kill(backend, signal.SIGKILL)
    sock.settimeout(5)
    assert recv_reply(sock).startswith(b"421 4.3.0"), "the client gets a reply, not a silent close"
    assert sock.recv(100) == b""
    server.wait_log(rf"tcpserver: end {pid} ")
    assert server.events("end")[-1]["reason"] == "backend_closed"


def test_garbage_and_overlong_lines_get_smtp_errors_not_tracebacks(tarpit_server):
    server = tarpit_server(RULES, control_files={"badheloarg": "localhost\n"})
    sock = server.connect(GOOD)
    recv_reply(sock)
    sock.sendall(b"\x00\xff\xfe garbage\r\n")
    assert recv_reply(sock)[:1] == b"5"
    sock.sendall(b"NOOP " + b"A" * 10000 + b"\r\n")
    assert recv_reply(sock).startswith(b"500 5.5.2")
    sock.sendall(b"NOOP\r\n")
    assert recv_reply(sock).startswith(b"250")
    sock.sendall(b"QUIT\r\n")
    assert recv_reply(sock).startswith(b"221")
    sock.close()
    assert "Traceback" not in server.log()


def test_idle_client_is_timed_out_with_421(tarpit_server):
    server = tarpit_server(RULES.replace('TARPIT="3"', 'TARPIT="3",TARPIT_TIMEOUT="1"'))
    sock = server.connect(BOT)
    recv_reply(sock)
    t = time.monotonic()
    assert recv_reply(sock).startswith(b"421 4.4.2")
    assert time.monotonic() - t < 5
    server.wait_log("event=end")
    assert server.events("end")[-1]["reason"] == "timeout"


def test_error_limit_drops_the_client(tarpit_server):
    rules = RULES.replace('TARPIT="3"', 'TARPIT="0",TARPIT_ERROR_HARD="3",TARPIT_ERROR_SLEEP="0"')
    server = tarpit_server(rules, control_files={"badheloarg": "localhost\n"})
    sock = server.connect(BOT)
    recv_reply(sock)
    got = b""
    for _ in range(3):
        sock.sendall(b"HELO localhost\r\n")
        got += recv_reply(sock)
    got += sock.recv(1000)
    assert got.count(b"553 ") == 3 and b"421 4.7.0" in got
    assert server.events("end")[-1]["reason"] == "too_many_errors"


def test_warn_mode_logs_every_decision_and_enforces_none(tarpit_server):
    rules = RULES.replace('TARPIT="3"', 'TARPIT="30",TARPIT_MODE="warn",TARPIT_GREYLIST="targrey"')
    server = tarpit_server(rules, control_files={"badheloarg": "localhost\n", "rcptusers": "bob\n"})
    t = time.monotonic()
    with smtp_from(server, BOT) as s:
        assert s.ehlo("localhost")[0] == 250
        s.mail("x@example.org")
        assert s.rcpt("nobody@example.com")[0] == 250
        assert s.rcpt("bob@example.com")[0] == 250
        s.data(b"Subject: warn\r\n\r\nmeasured, not refused\r\n")
    assert time.monotonic() - t < 10, "no 30 s tarpit in warn mode"
    warned = {e["event"] for e in server.events() if e.get("mode") == "warn"}
    assert {"helo_reject", "tarpit_start", "rcpt_reject"} <= warned
    assert len(server.messages()) == 1
    out = subprocess.run(["tarpitctl", "stats", str(server.logfile)], capture_output=True, text=True)
    assert "would tarpit" in out.stdout and "would refuse HELO" in out.stdout


def test_connections_per_ip_are_capped_on_both_paths(tarpit_server):
    rules = RULES.replace('TARPIT="3"', 'TARPIT="20",TARPIT_MAX_PER_IP="2"').replace(
        'TCPREMOTEHOST="mail.example.com"', 'TCPREMOTEHOST="mail.example.com",TARPIT_MAX_PER_IP="1"')
    server = tarpit_server(rules)
    held = [server.connect(BOT) for _ in range(2)]
    for s in held:
        assert recv_reply(s).startswith(b"220")
    third = server.connect(BOT)
    assert recv_reply(third) == b"421 4.7.0 Too many connections from your address, try again later\r\n"
    assert third.recv(10) == b""
    held.pop().close()
    server.wait_log(r"event=end reason=client_closed")
    again = server.connect(BOT)
    assert recv_reply(again).startswith(b"220"), "a closed connection frees its slot"

    first = server.connect(GOOD)  # fast path: the exec'd backend keeps the slot
    assert recv_reply(first).startswith(b"220")
    first_pid = pid_for(server, GOOD)
    assert server.events("exec")
    second = server.connect(GOOD)
    assert recv_reply(second).startswith(b"421 4.7.0")
    first.sendall(b"QUIT\r\n")
    recv_reply(first)
    first.close()
    server.wait_log(rf"tcpserver: end {first_pid} ")  # the backend holding the slot has exited
    with smtp_from(server, GOOD) as s:
        assert s.noop()[0] == 250
    assert [e["limit"] for e in server.events("conn_limit")] == ["2", "1"]
    for s in held + [again, third, second]:
        s.close()


def test_bdat_cannot_smuggle_recipients_past_rcptusers(tarpit_server):
    """tarpit-sink has no CHUNKING: BDAT is refused here and its chunk swallowed, never run."""
    server = tarpit_server(RULES, control_files={"rcptusers": "bob\n"})
    sock = server.connect(GOOD)
    recv_reply(sock)
    sock.sendall(b"EHLO mail.example.com\r\n")
    assert b"CHUNKING" not in recv_reply(sock)
    sock.sendall(b"MAIL FROM:<a@example.org>\r\n")
    recv_reply(sock)
    inner = b"RCPT TO:<bob@example.com>\r\nRCPT TO:<eve@example.com>\r\n"
    sock.sendall(b"BDAT %d\r\n" % len(inner) + inner + b"RCPT TO:<eve@example.com>\r\n")
    got = b""
    while got.count(b"\r\n") < 2:
        got += sock.recv(4096)
    assert [ln[:3] for ln in got.split(b"\r\n") if ln] == [b"503", b"550"], got
    sock.close()
    server.wait_log("event=end")
    assert [e["rcpt"] for e in server.events("rcpt_reject")] == ["eve@example.com"], \
        "the chunk's RCPT lines were data, swallowed; the one after it was checked"


def test_pipelined_command_storm_does_not_deadlock(tarpit_server):
    server = tarpit_server(RULES, control_files={"badheloarg": "localhost\n"})
    sock = server.connect(GOOD, timeout=60)
    recv_reply(sock)
    n = 100_000
    import threading

    got = bytearray()

    def reader():
        while got.count(b"\r\n") < n:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    sock.sendall(b"NOOP\r\n" * n)
    t.join(timeout=120)
    assert got.count(b"250 ") == n, f"{got.count(b'250 ')} of {n} replies"
    sock.close()


def test_client_that_never_reads_is_timed_out(tarpit_server):
    server = tarpit_server(RULES.replace('TCPREMOTEHOST="mail.example.com"',
                                         'TCPREMOTEHOST="mail.example.com",TARPIT_TIMEOUT="2"'),
                           control_files={"badheloarg": "localhost\n"})
    import socket as _socket

    sock = _socket.socket()
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4096)
    sock.bind((GOOD, 0))
    sock.connect(("127.0.0.1", server.port))
    pid = pid_for(server, GOOD)
    sock.setblocking(False)
    sent, t = 0, time.monotonic()
    while time.monotonic() - t < 3:
        try:
            sent += sock.send(b"NOOP\r\n" * 1000)
        except BlockingIOError:
            time.sleep(0.05)
    server.wait_log(rf"tcpserver: end {pid} ", timeout=30)
    assert server.events("end")[-1]["reason"] == "timeout"
    sock.close()


def test_replies_reach_a_client_that_half_closes_after_quit(tarpit_server):
    server = tarpit_server(RULES, control_files={"badheloarg": "localhost\n"})
    sock = server.connect(GOOD)
    recv_reply(sock)
    sock.sendall(b"HELO mail.example.com\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    got = b""
    while got.count(b"\r\n") < 4:
        got += sock.recv(4096)
    sock.sendall(b"Subject: half\r\n\r\nclose\r\n.\r\nQUIT\r\n")
    sock.shutdown(socket.SHUT_WR)
    rest = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    assert rest.startswith(b"250 ") and b"\r\n221 " in rest, rest
    assert server.messages() == [b"Subject: half\r\n\r\nclose\r\n"]


def test_backend_inherits_only_the_three_standard_fds(tarpit_server, tmp_path):
    fds = tmp_path / "fds"
    server = tarpit_server(RULES.replace('TARPIT="3"', 'TARPIT="1",TARPIT_MAX_PER_IP="3"'),
                           command=["tarpit-smtpd", "sh", "-c",
                                    f'ls -l /proc/self/fd > {fds}; exec tarpit-sink "$0"', str(tmp_path / "md")])
    with smtp_from(server, BOT) as s:
        assert s.noop()[0] == 250
    assert server.events("connect")[0]["class"] == "suspicious", "proxy path, greylist store open"
    # what ls (started like the backend, by its shell) inherited; minus its own /proc directory handle
    inherited = sorted(ln.split(" -> ")[0].split()[-1] for ln in fds.read_text().splitlines()
                       if " -> " in ln and "/proc/" not in ln)
    assert inherited == ["0", "1", "2"], fds.read_text()


def test_relayclient_users_are_served_even_with_a_broken_allow_list(tarpit_server):
    server = tarpit_server(RULES, control_files={"s25r-allow": "/unclosed[regex/\n"})
    sock = server.connect(TRUSTED)
    assert recv_reply(sock).startswith(b"220"), "our own users are not refused for a broken allow-list"
    sock.close()
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtp_from(server, GOOD)
    assert e.value.smtp_code == 451, "everyone else gets the temporary failure"
