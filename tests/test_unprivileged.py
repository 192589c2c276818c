"""The wrapper as a postmaster runs it: `tcpserver -u UID -g GID`, only its state dir writable.

conftest's `tarpit_server(..., user=USER)` makes the layout (see its docstring): every
file of the server root-owned and read-only for USER, the control dir readable, the
state dir USER's own (0700), the Maildir USER's (it is the backend's output).  USER is
`nobody`/`nogroup`, or a `tarpit-test` user made with useradd when there is no nobody.

What must work unprivileged: delivery through the proxy with taRgrey on (the SQLite store
is created and written by USER in the state dir), a tarpit loss recorded in it, the per-IP
slot lock file, the CDB verification cache.  And a state dir USER cannot write must not
stop mail: the wrapper fails open with `error` lines, never a crash and never a 451.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time

import pytest

from conftest import children_of, cmdline, recv_reply
from test_targrey_e2e import attempt

BOT, PATIENT, CAPPED = "127.0.0.3", "127.0.0.6", "127.0.0.9"
DYNAMIC = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
KNOBS = 'TARPIT="1",TARPIT_GREYLIST_DELAY="600"'
RULES = f"""
{BOT}:allow,TCPREMOTEHOST="{DYNAMIC}",{KNOBS}
{PATIENT}:allow,TCPREMOTEHOST="{DYNAMIC.replace('1234', '5678')}",{KNOBS}
{CAPPED}:allow,TCPREMOTEHOST="{DYNAMIC.replace('1234', '9999')}",TARPIT="3",TARPIT_MAX_PER_IP="1"
"""
MSG = b"Subject: unprivileged\r\n\r\ndelivered by nobody\r\n"


@pytest.fixture(scope="module")
def user() -> str:
    """An unprivileged user: nobody, else a `tarpit-test` system user made here."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start tcpserver -u/-g and to chown the state dir")
    for name in ("nobody", "tarpit-test"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid != 0:
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "tarpit-test"], check=True)
    return "tarpit-test"


def session(server, src: str, *, give_up_after: float | None = None, deliver: bool = True) -> bytes:
    """HELO, MAIL, RCPT (and DATA when the RCPT passes); returns the RCPT reply (b"" when we gave up)."""
    return attempt(server, src, give_up_after=give_up_after, deliver=deliver, message=MSG, timeout=20)


def wait_events(server, event: str, n: int, timeout: float = 10) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while len(server.events(event)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    found = server.events(event)
    assert len(found) >= n, server.log()
    return found


def uids_of(pid: int) -> set[int]:
    """The real and effective uids of `pid`."""
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("Uid:"))
    return set(map(int, line.split()[1:3]))


def owner(path) -> int:
    return os.stat(path).st_uid


def assert_no_error(server) -> None:
    assert server.events("error") == [], server.log()


def test_delivery_with_targrey_as_the_user(tarpit_server, user):
    uid = pwd.getpwnam(user).pw_uid
    server = tarpit_server(RULES, user=user, control_files={"rcptusers": "bob\n"})
    # a CDB made without this state dir: the first connection verifies it and records that in the state dir
    from libtarpit.control import compile_cdb
    compile_cdb(str(server.control / "rcptusers"), str(server.control / "rcptusers.cdb"), kind="rcptusers")
    os.chmod(server.control / "rcptusers.cdb", 0o644)
    for path in (server.state.parent, server.control, server.control / "rcptusers.cdb"):
        st = os.stat(path)
        assert st.st_uid == 0 and st.st_mode & 0o022 == 0, path  # root's, not writable by the user

    sock = server.connect(PATIENT, timeout=20)
    try:
        assert recv_reply(sock).startswith(b"220")
        procs = children_of(server.proc.pid)
        assert procs, "a wrapper runs for the connection"
        for pid in procs:
            assert uids_of(pid) == {uid}, (pid, cmdline(pid))
        sock.sendall(b"HELO mx.example.net\r\nMAIL FROM:<news@example.net>\r\n")
        assert recv_reply(sock).startswith(b"250")
        assert recv_reply(sock).startswith(b"250")
        t = time.monotonic()
        sock.sendall(b"RCPT TO:<bob@example.com>\r\n")
        assert recv_reply(sock).startswith(b"250")
        assert time.monotonic() - t >= 0.9, "first contact: taRgrey tarpits"
        sock.sendall(b"RCPT TO:<nosuchuser@example.com>\r\n")
        assert recv_reply(sock).startswith(b"550 5.1.1"), "rcptusers.cdb is read by the user"
        sock.sendall(b"DATA\r\n")
        assert recv_reply(sock).startswith(b"354")
        sock.sendall(MSG + b".\r\nQUIT\r\n")
        assert recv_reply(sock).startswith(b"250")
        assert recv_reply(sock).startswith(b"221")
    finally:
        sock.close()
    wait_events(server, "end", 1)
    assert server.messages() == [MSG]
    assert [e["class"] for e in server.events("connect")] == ["suspicious"]
    assert_no_error(server)

    store = server.state / "greylist.sqlite"
    assert store.exists() and owner(store) == uid, "the user created the SQLite store in its state dir"
    assert owner(server.state / "cdb-verified") == uid, "the CDB verdict is cached by the user"
    # the whitelisting after delivery was written: the next message skips the tarpit
    t = time.monotonic()
    assert session(server, PATIENT).startswith(b"250")
    assert time.monotonic() - t < 0.9
    assert server.events("greylist_pass")[-1]["reason"] == "whitelisted"
    assert server.messages() == [MSG, MSG]
    # nothing but the state dir (and the backend's Maildir) was written by the user
    base = server.state.parent
    written = {p for p in base.rglob("*") if owner(p) == uid}
    assert all(p == server.state or server.state in p.parents or p == server.maildir
               or server.maildir in p.parents for p in written), written
    assert_no_error(server)


def test_tarpit_loss_is_recorded_by_the_user(tarpit_server, user):
    server = tarpit_server(RULES, user=user)
    assert session(server, BOT, give_up_after=0.3) == b"", "gave up during the 1 s tarpit"
    [lost] = wait_events(server, "tarpit_lost", 1)
    assert lost["stage"] == "rcpt"
    wait_events(server, "end", 1)
    t = time.monotonic()
    reply = session(server, BOT)
    assert reply.startswith(b"450 4.7.1 <bob@example.com>: Greylisted"), reply
    assert time.monotonic() - t < 0.9, "the recorded loss defers at once, without a tarpit"
    assert server.events("greylist_defer")[-1]["reason"] == "too_early"
    assert server.messages() == []
    assert_no_error(server)


def test_per_ip_cap_lock_file_as_the_user(tarpit_server, user):
    uid = pwd.getpwnam(user).pw_uid
    server = tarpit_server(RULES, user=user)
    first = server.connect(CAPPED, timeout=20)
    try:
        assert recv_reply(first).startswith(b"220")
        second = server.connect(CAPPED, timeout=20)
        try:
            reply = recv_reply(second)
            assert reply.startswith(b"421 4.7.0 Too many connections"), reply
        finally:
            second.close()
    finally:
        first.close()
    [limit] = wait_events(server, "conn_limit", 1)
    assert limit["limit"] == "1"
    lock = server.state / "connections.lock"
    assert lock.exists() and owner(lock) == uid
    wait_events(server, "end", 2)
    # the slot is free again once the first connection is gone
    third = server.connect(CAPPED, timeout=20)
    try:
        assert recv_reply(third).startswith(b"220")
    finally:
        third.close()
    wait_events(server, "end", 3)
    assert len(server.events("conn_limit")) == 1
    assert_no_error(server)


def test_state_dir_not_writable_fails_open(tarpit_server, user):
    """The user cannot write its state dir: greylist, slot lock and CDB cache fail open, with `error` lines."""
    server = tarpit_server(RULES, user=user, control_files={"rcptusers": "bob\n"})
    from libtarpit.control import compile_cdb
    compile_cdb(str(server.control / "rcptusers"), str(server.control / "rcptusers.cdb"), kind="rcptusers")
    os.chmod(server.control / "rcptusers.cdb", 0o644)
    os.chown(server.state, 0, 0)
    os.chmod(server.state, 0o755)

    t = time.monotonic()
    assert session(server, PATIENT).startswith(b"250"), "greylist trouble is no 451"
    assert time.monotonic() - t >= 0.9, "the tarpit still runs when the store fails"
    cap = server.connect(CAPPED, timeout=20)
    try:
        assert recv_reply(cap).startswith(b"220"), "a slot lock that cannot be used lets the client in"
        cap.sendall(b"QUIT\r\n")
        assert recv_reply(cap).startswith(b"221")
    finally:
        cap.close()
    wait_events(server, "end", 2)
    assert server.messages() == [MSG]
    errors = server.events("error")
    assert {e["what"] for e in errors} == {"greylist", "conn_limit"}, server.log()
    assert all(e["what"] != "internal" for e in errors)
    # after QUIT and 221 the client's close and the backend's race: either is a clean end
    assert {e["reason"] for e in server.events("end")} <= {"backend_closed", "client_closed"}, server.log()
    assert "Traceback" not in server.log()
    assert os.listdir(server.state) == []
