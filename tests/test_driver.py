"""The wrapper's driver on its own: Outbox, Backend, and run() over a socketpair (no tcpserver)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from conftest import recv_reply
from tarpit_wrappers import tarpit_smtpd as W


def test_outbox_never_blocks_on_a_peer_that_does_not_read_and_notices_it_going():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    box = W.Outbox(ours.send)
    box.buf += b"x" * (W.BUFFER_LIMIT * 8)
    assert box.flush() is True and box.buf, "what the peer does not take stays queued"
    assert box.full
    theirs.close()
    for _ in range(3):
        if not box.flush():
            break
    assert box.gone and not box.buf


def test_backend_stop_lets_a_backend_exit_on_its_own_then_terms_one_that_does_not():
    polite = W.Backend(["sh", "-c", "cat >/dev/null; exit 3"])
    assert polite.stop(linger=5.0) == 3, "it saw EOF and exited by itself"
    stubborn = W.Backend(["sh", "-c", "trap '' HUP; exec sleep 30"])
    t = time.monotonic()
    assert stubborn.stop(linger=0.0) == -signal.SIGTERM
    assert time.monotonic() - t < 2.0


def wrapper(tmp_path, env: dict[str, str], backend: list[str]):
    """tarpit-smtpd on one end of a socketpair, as tcpserver would start it; return (client sock, proc)."""
    client, server = socket.socketpair()
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    (control / "badheloarg").write_text("localhost\n")  # a list: the client is proxied
    full = {"PATH": os.environ["PATH"], "TCPREMOTEIP": "192.0.2.1", "TCPREMOTEHOST": "mail.example.org",
            "TARPIT_CONTROL": str(control), "TARPIT_STATE_DIR": str(tmp_path), **env}
    proc = subprocess.Popen([sys.executable, "-m", "tarpit_wrappers.tarpit_smtpd", *backend],
                            stdin=server, stdout=server, stderr=subprocess.PIPE, env=full)
    server.close()
    client.settimeout(10)
    return client, proc


def test_end_is_the_last_line_and_a_backend_that_quit_is_not_killed(tmp_path):
    client, proc = wrapper(tmp_path, {}, ["tarpit-sink", str(tmp_path / "md")])
    assert recv_reply(client).startswith(b"220")
    client.sendall(b"QUIT\r\n")
    assert recv_reply(client).startswith(b"221")
    client.close()
    err = proc.communicate(timeout=10)[1].decode()
    lines = [ln for ln in err.splitlines() if ln.startswith("tarpit-smtpd ")]
    assert "event=end" in lines[-1], err
    assert "what=backend" not in err, "after 221 the backend exits on its own"
    assert proc.returncode == 0


def test_a_backend_that_dies_mid_session_leaves_the_client_a_421(tmp_path):
    client, proc = wrapper(tmp_path, {}, ["sh", "-c", "printf '220 hi\\r\\n'; read line; exit 1"])
    assert recv_reply(client).startswith(b"220")
    client.sendall(b"NOOP\r\n")
    assert recv_reply(client).startswith(b"421 4.3.0")
    err = proc.communicate(timeout=10)[1].decode()
    assert 'detail="closed in mid-session"' in err and err.rstrip().splitlines()[-1].count("event=end") == 1


def test_a_half_closed_client_still_gets_its_replies(tmp_path):
    client, proc = wrapper(tmp_path, {}, ["tarpit-sink", str(tmp_path / "md")])
    assert recv_reply(client).startswith(b"220")
    client.sendall(b"HELO mail.example.org\r\nNOOP\r\nQUIT\r\n")
    client.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := client.recv(4096):
        got += chunk
    assert [ln[:3] for ln in got.split(b"\r\n") if ln] == [b"250", b"250", b"221"], got
    proc.wait(timeout=10)
