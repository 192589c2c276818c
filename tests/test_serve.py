"""`tarpit-smtpd serve`: the listener in tcpserver's place, the same tests as the wrapper's.

The same tcprules CDB, the same environment for the backend, the same admission
and session; one process holds every client that is not exec'd.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import time

import pytest
from conftest import need, recv_reply
from tls_backend import exim_tls  # noqa: F401  (a fixture)
from test_wrapper_e2e import BOT, DYNAMIC, GOOD, MESSAGE, RULES, TRUSTED

DENIED = "127.0.0.9"
SERVE_RULES = RULES + f'{DENIED}:deny\n'


def smtp_from(server, src: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.port, source_address=(src, 0), timeout=30)


def test_good_client_delivers_byte_for_byte_through_the_proxy(tarpit_server):
    server = tarpit_server(SERVE_RULES, control_files={"rcptusers": "bob\n"}, listener=True)
    with smtp_from(server, GOOD) as s:
        assert s.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}
        code, _ = s.rcpt("eve@example.com") if s.mail("a@example.org")[0] == 250 else (0, b"")
        assert code == 550, "rcptusers applies"
    assert server.messages() == [MESSAGE]
    server.wait_log("event=end")
    assert not server.events("exec") and server.events("connect")[0]["class"] == "normal"


def test_trusted_client_gets_the_backend_on_its_own_socket_with_tcpservers_environment(tarpit_server, tmp_path):
    envfile = tmp_path / "env"
    server = tarpit_server(SERVE_RULES, listener=True, command=[
        "tarpit-smtpd", "sh", "-c", f'env > {envfile}; exec tarpit-sink "$0"', str(tmp_path / "md")])
    with smtp_from(server, TRUSTED) as s:
        assert s.noop()[0] == 250
    assert server.events("exec")
    env = dict(ln.split("=", 1) for ln in envfile.read_text().splitlines() if "=" in ln)
    assert env["PROTO"] == "TCP" and env["TCPREMOTEIP"] == TRUSTED and env["TCPLOCALIP"] == "127.0.0.1"
    assert env["TCPLOCALPORT"] == str(server.port) and env["TCPLOCALHOST"] == "0"
    assert "RELAYCLIENT" in env and env["TCPREMOTEHOST"] == DYNAMIC, "the rule's variables are applied"
    assert "TCPREMOTEINFO" not in env


def test_a_bot_that_leaves_the_tarpit_is_greylisted_on_its_next_attempt(tarpit_server):
    rules = SERVE_RULES.replace('TARPIT="3",TARPIT_GREYLIST="off"', 'TARPIT="20"')
    server = tarpit_server(rules, listener=True)
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(BOT, 0), timeout=10)
    assert recv_reply(sock).startswith(b"220")
    for line in (b"EHLO bot.example\r\n", b"MAIL FROM:<spam@example.org>\r\n"):
        sock.sendall(line)
        assert recv_reply(sock)[:1] == b"2"
    sock.sendall(b"RCPT TO:<bob@example.com>\r\n")
    server.wait_log("event=tarpit_start")
    time.sleep(0.3)
    sock.close()
    server.wait_log("event=end reason=tarpit_lost")
    assert 0.2 < float(server.events("tarpit_lost")[0]["elapsed"]) < 5
    with smtp_from(server, BOT) as s:
        s.ehlo("bot.example")
        s.mail("spam@example.org")
        assert s.rcpt("bob@example.com")[0] == 450, "taRgrey: it gave up, so it is deferred"


def test_a_denied_client_is_closed_without_a_word(tarpit_server):
    server = tarpit_server(SERVE_RULES, listener=True)
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(DENIED, 0), timeout=10)
    assert sock.recv(100) == b""
    assert f"deny {DENIED}" in server.log()


def test_many_bots_held_in_the_tarpit_by_one_process(tarpit_server):
    n = 60
    rules = SERVE_RULES.replace('TARPIT="3",TARPIT_GREYLIST="off"', 'TARPIT="30",TARPIT_GREYLIST="off"')
    server = tarpit_server(rules, listener=True, concurrency=n + 5)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", server.port), source_address=(BOT, 0), timeout=10)
        assert recv_reply(s).startswith(b"220")
        for line in (b"HELO bot.example\r\n", b"MAIL FROM:<x@example.org>\r\n"):
            s.sendall(line)
            assert recv_reply(s).startswith(b"250")
        s.sendall(b"RCPT TO:<bob@example.com>\r\n")
        socks.append(s)
    deadline = time.monotonic() + 20
    while len(server.events("tarpit_start")) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.events("tarpit_start")) == n
    for s in socks:
        s.close()
    deadline = time.monotonic() + 20
    while len(server.events("end")) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["reason"] for e in server.events("end")] == ["tarpit_lost"] * n
    assert len({e["pid"] for e in server.events("connect")}) == 1, "one process held them all"


def test_starttls_terminated_by_the_listener_keeps_the_checks(tarpit_server, exim_tls):
    import ssl

    server = tarpit_server(SERVE_RULES, command=["tarpit-smtpd", *exim_tls.command()], listener=True,
                           env={"TARPIT_TLS_CERT": str(exim_tls.servercert)},
                           control_files={"rcptusers": "bob\n"})
    with smtp_from(server, GOOD) as s:
        s.starttls(context=ssl.create_default_context(cafile=str(exim_tls.ca)))
        s.ehlo("mail.example.org")
        s.mail("a@example.org")
        assert s.rcpt("eve@example.com")[0] == 550, "rcptusers inside TLS"
        assert s.rcpt("bob@example.com")[0] == 250
        assert s.data(MESSAGE)[0] == 250
    server.wait_log("event=end")
    assert server.events("end")[0].get("tls") == "1" and server.events("tls")


def test_over_the_concurrency_limit_a_client_gets_421(tarpit_server):
    server = tarpit_server(SERVE_RULES, listener=True, concurrency=1)
    first = socket.create_connection(("127.0.0.1", server.port), source_address=(GOOD, 0), timeout=10)
    assert recv_reply(first).startswith(b"220")
    second = socket.create_connection(("127.0.0.1", server.port), source_address=(GOOD, 0), timeout=10)
    assert recv_reply(second).startswith(b"421 4.3.2")
    first.close()


def test_sighup_reads_tarpit_toml_again(tarpit_server):
    import signal

    server = tarpit_server(SERVE_RULES, listener=True, control_files={"rcptusers": "bob\n"})
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.com")
        s.mail("a@example.org")
        assert s.rcpt("eve@example.com")[0] == 550
    (server.control / "tarpit.toml").write_text('[normal]\nrcpt = "ignore"\n')
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("reloaded ")
    with smtp_from(server, GOOD) as s:
        s.ehlo("mail.example.com")
        s.mail("a@example.org")
        assert s.rcpt("eve@example.com")[0] == 250, "the new configuration applies to new clients"


def test_sigusr1_snapshot_and_sigterm_lets_a_held_session_finish(tarpit_server):
    import signal

    server = tarpit_server(SERVE_RULES, listener=True, control_files={"rcptusers": "bob\n"})
    bot = socket.create_connection(("127.0.0.1", server.port), source_address=(BOT, 0), timeout=10)
    assert recv_reply(bot).startswith(b"220")
    for line in (b"HELO bot.example\r\n", b"MAIL FROM:<x@example.org>\r\n"):
        bot.sendall(line)
        assert recv_reply(bot).startswith(b"250")
    bot.sendall(b"RCPT TO:<bob@example.com>\r\n")
    server.wait_log("event=tarpit_start")
    good = smtp_from(server, GOOD)
    server.proc.send_signal(signal.SIGUSR1)
    line = server.wait_log(r"snapshot .*").group(0)
    assert "sleeping:rcpt=1" in line and "suspicious=1" in line and "normal=1" in line, line
    server.proc.send_signal(signal.SIGTERM)
    server.wait_log("stopping: ")
    try:
        refused = socket.create_connection(("127.0.0.1", server.port), timeout=2)
        assert refused.recv(100) == b"", "no new client is served"
    except OSError:
        pass  # refused outright: the listening socket is closed
    assert good.sendmail("a@example.org", ["bob@example.com"], MESSAGE) == {}, "a held session finishes"
    good.quit()
    assert recv_reply(bot).startswith(b"250"), "the tarpitted bot is answered once its tarpit ends"
    bot.close()
    server.proc.wait(timeout=30)


def test_the_exec_fast_path_hands_over_a_blocking_socket(tarpit_server, tmp_path):
    """A backend that reads before the client has written must wait, not see EAGAIN as an end."""
    out = tmp_path / "flags"
    server = tarpit_server(SERVE_RULES, listener=True, command=[
        "tarpit-smtpd", "sh", "-c",
        f'python3 -c "import os,fcntl; print(fcntl.fcntl(0, fcntl.F_GETFL) & os.O_NONBLOCK)" > {out}; '
        'exec tarpit-sink "$0"', str(tmp_path / "md")])
    with smtp_from(server, TRUSTED) as s:
        assert s.noop()[0] == 250
    assert out.read_text().strip() == "0"


CAPPED = "127.0.0.15"  # suspicious, at most 2 connections at once
CAP_RULES = SERVE_RULES + (
    f'{CAPPED}:allow,TCPREMOTEHOST="p1234-ipbf56abcdef.tokyo.ocn.ne.jp",TARPIT="30",'
    'TARPIT_MAX_PER_IP="2",TARPIT_GREYLIST="off"\n')


def test_two_workers_share_the_port_and_keep_the_per_ip_cap(tarpit_server):
    import signal

    server = tarpit_server(CAP_RULES, listener=True, options=("--workers=2",))
    assert server.wait_log(r"workers: 2 \((\d+) (\d+)\)")
    held = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", server.port), source_address=(CAPPED, 0), timeout=10)
        assert recv_reply(s).startswith(b"220")
        held.append(s)
    third = socket.create_connection(("127.0.0.1", server.port), source_address=(CAPPED, 0), timeout=10)
    assert recv_reply(third).startswith(b"421 4.7.0"), "the cap counts both connections, whichever worker"
    third.close()
    for n in range(2, 12):  # other addresses are spread over both workers
        with smtp_from(server, f"127.0.1.{n}") as s:
            assert s.noop()[0] == 250
    pids = {e["pid"] for e in server.events("connect")}
    assert len(pids) == 2, pids
    assert {e["pid"] for e in server.events("connect") if e["ip"] == CAPPED} == {
        server.events("conn_limit")[0]["pid"]}, "one address, one worker"
    server.proc.send_signal(signal.SIGUSR1)
    server.wait_log(r"snapshot worker=1 ")
    server.wait_log(r"snapshot worker=0 ")
    for s in held:
        s.close()


def test_over_the_backend_limit_a_client_gets_421_when_its_backend_is_due(tarpit_server):
    server = tarpit_server(SERVE_RULES, listener=True, options=("--backends=1",))
    first = socket.create_connection(("127.0.0.1", server.port), source_address=(GOOD, 0), timeout=10)
    assert recv_reply(first).startswith(b"220"), "its backend runs"
    second = socket.create_connection(("127.0.0.1", server.port), source_address=(GOOD, 0), timeout=10)
    assert recv_reply(second) == b"421 4.3.2 Too busy, try again later\r\n"
    server.wait_log("event=end reason=backend_limit")
    assert server.events("backend_limit")[0]["limit"] == "1"
    first.sendall(b"QUIT\r\n")
    assert recv_reply(first).startswith(b"221")
    first.close()
    deadline = time.monotonic() + 10
    while not server.log().rstrip().endswith("status: 0/40") and time.monotonic() < deadline:
        time.sleep(0.05)  # the exec'd backend has exited: its slot is free
    with smtp_from(server, GOOD) as s:  # the slot is free again once the first backend is gone
        assert s.noop()[0] == 250


def test_daemon_detaches_writes_its_pid_file_and_removes_it_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess

    from conftest import free_port

    port, pidfile, log = free_port(), tmp_path / "serve.pid", tmp_path / "serve.log"
    (tmp_path / "control").mkdir()
    env = dict(os.environ, TARPIT_CONTROL=str(tmp_path / "control"), TARPIT_STATE_DIR=str(tmp_path))
    done = subprocess.run(["tarpit-smtpd", "serve", "--daemon", f"--pidfile={pidfile}", f"--log={log}", "-vRH",
                           "127.0.0.1", str(port), "tarpit-sink", str(tmp_path / "md")],
                          env=env, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0), "a session of its own: detached from ours"
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            assert s.noop()[0] == 250
        again = subprocess.run(["tarpit-smtpd", "serve", "--daemon", f"--pidfile={pidfile}", f"--log={log}",
                                "127.0.0.1", str(free_port()), "tarpit-sink", str(tmp_path / "md")],
                               env=env, capture_output=True, timeout=30)
        assert again.returncode == 111 and f"held by running process {pid}".encode() in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists(), "removed on the way out"
    assert b"event=end" in log.read_bytes() and b"stopping: " in log.read_bytes(), "its log went to --log"
    state = "?"
    while time.monotonic() < deadline:  # gone, or a zombie where this machine's pid 1 does not reap
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.05)  # the pid file goes just before the process does
    assert state in ("gone", "Z"), f"process {pid} still running ({state})"


def test_two_thousand_clients_held_in_the_greet_pause_by_one_process(tarpit_server):
    """A bot storm: every client waits in the greet pause, no backend started, one process."""
    import resource
    import signal

    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n + 200:  # our clients and the listener's ends; the listener inherits the limit
        assert hard >= 2 * n + 200, f"RLIMIT_NOFILE hard limit {hard} is below {2 * n + 200}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 200, hard))
    rules = SERVE_RULES + '127.1.:allow,GREETDELAY="600"\n'
    server = tarpit_server(rules, listener=True, concurrency=n + 10)
    held = []
    try:
        for i in range(n):
            held.append(socket.create_connection(("127.0.0.1", server.port),
                                                 source_address=(f"127.1.{i // 200}.{i % 200 + 1}", 0), timeout=30))
        deadline = time.monotonic() + 60
        while len(server.events("connect")) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        server.proc.send_signal(signal.SIGUSR1)
        line = server.wait_log(r"snapshot .*", timeout=30).group(0)
        assert f"active={n} backends=0 " in line and f"sleeping:greet={n}" in line, line
        with smtp_from(server, GOOD) as s:  # the held ones do not stop a good client
            assert s.noop()[0] == 250
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 60
    while len(server.events("end")) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    ends = server.events("end")
    assert len(ends) == n and {e["reason"] for e in ends} == {"greet_lost"}
    assert len({e["pid"] for e in server.events("connect")}) == 1, "one process held them all"
    server.proc.send_signal(signal.SIGUSR1)
    assert server.wait_log(r"snapshot active=0 backends=0 ", timeout=30)


STALLING_BACKEND = r'''
import sys, time
out, inp = sys.stdout.buffer, sys.stdin.buffer
def say(line):
    out.write(line + b"\r\n"); out.flush()
say(b"220 stall.example ESMTP")
while line := inp.readline():
    verb = line[:4].upper()
    if verb == b"DATA":
        say(b"354 go ahead")
        time.sleep(4)  # a backend busy elsewhere: the client's body must wait, not pile up in the listener
        size = 0
        while (body := inp.readline()) not in (b".\r\n", b""):
            size += len(body)
        open(sys.argv[1], "w").write(str(size))
        say(b"250 ok")
    elif verb == b"QUIT":
        say(b"221 bye"); break
    else:
        say(b"250 ok")
'''


def test_a_backend_slower_than_its_client_stops_the_listener_reading_the_client(tarpit_server, tmp_path):
    import sys
    import threading

    script, size_file = tmp_path / "stall.py", tmp_path / "size"
    script.write_text(STALLING_BACKEND)
    server = tarpit_server(SERVE_RULES, listener=True, control_files={"rcptusers": "bob\n"},
                           command=["tarpit-smtpd", sys.executable, str(script), str(size_file)])
    body = b"".join(b"%07d " % i + b"x" * 90 + b"\r\n" for i in range(400_000))  # 40 MB
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(GOOD, 0), timeout=60)
    assert recv_reply(sock).startswith(b"220")
    for line in (b"HELO mail.example.com\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<bob@example.com>\r\n",
                 b"DATA\r\n"):
        sock.sendall(line)
        assert recv_reply(sock)[:1] in (b"2", b"3")
    rss = []

    def rss_kb() -> int:
        for line in open(f"/proc/{server.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    before = rss_kb()
    sender = threading.Thread(target=sock.sendall, args=(body + b".\r\n",))
    sender.start()
    for _ in range(30):  # during the backend's 4 s stall
        rss.append(rss_kb())
        time.sleep(0.1)
    sender.join(60)
    assert recv_reply(sock).startswith(b"250")
    assert int(size_file.read_text()) == len(body), "every byte arrived"
    assert max(rss) - before < 16 * 1024, f"the listener grew by {max(rss) - before} KB holding a 40 MB body"
    sock.close()


@pytest.fixture
def identd():
    """A real ident server (oidentd) on 127.0.0.2:113, as root: what a client's host may run."""
    import subprocess

    binary = need("oidentd")
    probe = socket.socket()
    try:
        probe.connect(("127.0.0.2", 113))
        probe.close()
        yield None  # one is running already (the package's own service): it answers the same
        return
    except OSError:
        probe.close()
    proc = subprocess.Popen([binary, "-i", "-S", "-a", "127.0.0.2", "-p", "113"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.2", 113), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "oidentd did not start"
            time.sleep(0.05)
    yield proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("flags", ["-vRHl0", "-vrHl0", "-vRhl0"])
def test_env_as_the_backend_prints_the_same_under_tcpserver_and_serve(tmp_path, flags, identd):
    """The issue's test: `env` as the backend, both servers, the same variables apart from ports.

    And the wrapper under tcpserver hands its backend the same: Python started in the C locale
    sets LC_CTYPE=C.UTF-8 for its children (PEP 538), which both undo."""
    import os
    import subprocess

    from conftest import free_port

    rules = tmp_path / "rules"
    rules.write_text('127.0.0.3:allow,RELAYCLIENT="",X_RULE="three",KEEP="2"\n:allow,RELAYCLIENT=""\n')
    with open(rules) as f:
        subprocess.run(["tcprules", str(tmp_path / "rules.cdb"), str(tmp_path / "rules.tmp")], stdin=f, check=True)
    (tmp_path / "control").mkdir()
    env = {"PATH": os.environ["PATH"], "KEEP": "1", "TARPIT_CONTROL": str(tmp_path / "control"),
           "TARPIT_STATE_DIR": str(tmp_path)}
    printed = {}
    procs = []
    try:
        for name, argv0, wrapper in (("tcpserver", ["tcpserver"], []), ("serve", ["tarpit-smtpd", "serve"], []),
                                     ("wrapper", ["tcpserver"], ["tarpit-smtpd"])):
            port, log = free_port(), tmp_path / f"{name}.log"
            procs.append(subprocess.Popen([*argv0, flags, "-x", str(tmp_path / "rules.cdb"), "127.0.0.1", str(port),
                                           *wrapper, "env"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
            deadline = time.monotonic() + 10
            while b"status: 0/" not in log.read_bytes():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            for src in ("127.0.0.2", "127.0.0.3"):
                with socket.create_connection(("127.0.0.1", port), timeout=40, source_address=(src, 0)) as s:
                    out = b""
                    while chunk := s.recv(65536):
                        out += chunk
                got = dict(line.split("=", 1) for line in out.decode().splitlines())
                for port_var in ("TCPLOCALPORT", "TCPREMOTEPORT"):
                    assert got.pop(port_var).isdigit()
                printed[name, src] = got
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    for src in ("127.0.0.2", "127.0.0.3"):
        assert printed["serve", src] == printed["tcpserver", src], src
        assert printed["wrapper", src] == printed["tcpserver", src], f"{src}: the wrapper adds or changes nothing"
    if "r" in flags:  # the identd answers for our own connection from 127.0.0.2
        info = printed["serve", "127.0.0.2"].get("TCPREMOTEINFO")
        if identd is not None:  # ours, as root, with oidentd's defaults: the user's name
            assert info == "root"
        else:  # the machine's own ident service, whatever its configuration answers
            assert info is not None
    assert printed["serve", "127.0.0.3"]["X_RULE"] == "three" and printed["serve", "127.0.0.3"]["KEEP"] == "2"


def test_serve_hp_runs_under_a_memory_limit_like_softlimit_m(tmp_path):
    """`softlimit -m` in a daemontools run file limits address space and each thread's stack:
    the name lookups of -h and -p run in the event loop, so no thread is needed for them."""
    import os
    import resource
    import subprocess

    from conftest import free_port

    limit = 200_000_000

    def limited() -> None:
        for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
            resource.setrlimit(which, (limit, limit))

    (tmp_path / "control").mkdir()
    port, log = free_port(), tmp_path / "serve.log"
    env = dict(os.environ, TARPIT_CONTROL=str(tmp_path / "control"), TARPIT_STATE_DIR=str(tmp_path))
    proc = subprocess.Popen(["tarpit-smtpd", "serve", "-vRl0", "-hp", "127.0.0.1", str(port), "tarpit-sink",
                             str(tmp_path / "md")], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            preexec_fn=limited, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while b"status: 0/" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for src in (BOT, GOOD):
            with socket.create_connection(("127.0.0.1", port), source_address=(src, 0), timeout=30) as s:
                assert recv_reply(s).startswith(b"220"), log.read_text()
        assert "thread" not in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_the_idle_timeout_counts_from_the_clients_last_command(tarpit_server):
    """serve arms its deadline timer lazily (not once per event): a client active within the
    timeout is never cut off at the first deadline, and an idle one gets 421 and an end line."""
    rules = SERVE_RULES + '127.0.0.16:allow,TCPREMOTEHOST="mail.example.com",TARPIT_TIMEOUT="4"\n'
    server = tarpit_server(rules, listener=True, control_files={"rcptusers": "bob\n"})
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.16", 0), timeout=30)
    assert recv_reply(sock).startswith(b"220")
    sock.sendall(b"HELO mail.example.com\r\n")
    assert recv_reply(sock).startswith(b"250")
    for _ in range(2):  # 6 s in all, past the first deadline (4 s after HELO)
        time.sleep(3)
        sock.sendall(b"NOOP\r\n")
        assert recv_reply(sock).startswith(b"250"), "active within the timeout: still served"
    assert recv_reply(sock).startswith(b"421 4.4.2"), "then idle for 4 s: timed out"
    sock.close()
    assert server.wait_log("event=end reason=timeout")
