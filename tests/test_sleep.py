"""libtarpit.sleep over real socketpairs, TCP sockets on 127.0.0.1 and pipes.

The "server" end is the fd we sleep on (fd 0 under tcpserver); the "client"
end is driven from a thread after a short delay.  Timing bounds are generous:
these run on shared 2-core machines.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import signal
import socket
import struct
import threading
import time
from typing import Callable, Iterator

import pytest

from libtarpit.sleep import Outcome, SleepResult, sleep


def later(delay: float, action: Callable[[], object]) -> threading.Thread:
    """Run `action` in a thread after `delay` seconds (the misbehaving client)."""
    def run() -> None:
        time.sleep(delay)
        action()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(server, client): a real TCP connection over loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def unix_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


@pytest.fixture(params=["tcp", "socketpair"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = tcp_pair() if request.param == "tcp" else unix_pair()
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = tcp_pair()
    yield server, client
    server.close()
    client.close()


def read_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


# --- disconnects end the sleep -------------------------------------------------

def test_close_at_0_1s_ends_a_5s_sleep_at_once(pair):
    server, client = pair
    later(0.1, client.close)
    result = sleep(server.fileno(), 5.0)
    assert result.outcome is Outcome.DISCONNECTED
    assert result.disconnected
    assert 0.05 <= result.elapsed < 1.0
    assert result.early == b"" and result.early_at is None
    assert not result.pipelined and not result.truncated


def test_data_then_close_keeps_the_data(pair):
    server, client = pair

    def talk_and_leave() -> None:
        client.sendall(b"DATA\r\n")
        time.sleep(0.1)
        client.sendall(b"QUIT\r\n")
        client.close()

    later(0.1, talk_and_leave)
    result = sleep(server.fileno(), 5.0)
    assert result.outcome is Outcome.DISCONNECTED
    assert result.early == b"DATA\r\nQUIT\r\n"
    assert result.pipelined
    assert result.early_at is not None and 0.05 <= result.early_at < 1.0
    assert result.early_at <= result.elapsed < 2.0


def test_data_and_close_in_one_go_keeps_the_data(tcp):
    server, client = tcp
    later(0.1, lambda: (client.sendall(b"RCPT TO:<a@b>\r\n"), client.close()))
    result = sleep(server.fileno(), 5.0)
    assert result.outcome is Outcome.DISCONNECTED
    assert result.early == b"RCPT TO:<a@b>\r\n"


def test_reset_is_a_disconnect(tcp):
    server, client = tcp

    def reset() -> None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    later(0.1, reset)
    result = sleep(server.fileno(), 5.0)
    assert result.outcome is Outcome.DISCONNECTED
    assert 0.05 <= result.elapsed < 1.0


def test_half_close_counts_as_disconnect(tcp):
    # A client that shut down its sending side can never send QUIT: it is gone.
    server, client = tcp
    later(0.1, lambda: client.shutdown(socket.SHUT_WR))
    result = sleep(server.fileno(), 5.0)
    assert result.outcome is Outcome.DISCONNECTED
    assert result.elapsed < 1.0


# --- the full time passes --------------------------------------------------------

def test_quiet_client_sits_out_the_whole_sleep(pair):
    server, _client = pair
    start = time.monotonic()
    result = sleep(server.fileno(), 0.3)
    waited = time.monotonic() - start
    assert result.outcome is Outcome.ELAPSED
    assert not result.disconnected
    assert result.early == b"" and result.early_at is None and not result.truncated
    assert 0.29 <= result.elapsed < 2.0
    assert 0.29 <= waited < 2.0


def test_talking_client_is_kept_and_the_sleep_goes_on(pair):
    server, client = pair
    later(0.1, lambda: client.sendall(b"MAIL FROM:<x@y>\r\n"))
    later(0.2, lambda: client.sendall(b"RCPT TO:<a@b>\r\n"))
    result = sleep(server.fileno(), 0.5)
    assert result.outcome is Outcome.ELAPSED
    assert result.early == b"MAIL FROM:<x@y>\r\nRCPT TO:<a@b>\r\n"
    assert result.pipelined
    assert result.early_at is not None and 0.05 <= result.early_at < 0.45
    assert result.elapsed >= 0.49


# --- max_early -----------------------------------------------------------------

def test_more_than_max_early_is_truncated_and_the_rest_stays_on_the_socket(tcp):
    server, client = tcp
    payload = bytes(range(256)) * 400  # 102400 bytes, all byte values
    later(0.05, lambda: client.sendall(payload))
    result = sleep(server.fileno(), 0.5, max_early=1000)
    assert result.outcome is Outcome.ELAPSED
    assert result.truncated and result.pipelined
    assert result.early == payload[:1000]
    assert read_exactly(server, len(payload) - 1000) == payload[1000:]


def test_truncated_then_close_is_still_seen_and_nothing_is_lost(tcp):
    server, client = tcp
    payload = b"x" * 5000 + b"y" * 5000
    later(0.1, lambda: (client.sendall(payload), client.close()))
    result = sleep(server.fileno(), 5.0, max_early=4096)
    assert result.outcome is Outcome.DISCONNECTED
    assert result.elapsed < 1.5
    assert result.truncated
    assert result.early == payload[:4096]
    assert read_exactly(server, len(payload)) == payload[4096:]


def test_exactly_max_early_is_not_truncated(tcp):
    server, client = tcp
    later(0.05, lambda: client.sendall(b"a" * 100))
    result = sleep(server.fileno(), 0.3, max_early=100)
    assert result.outcome is Outcome.ELAPSED
    assert result.early == b"a" * 100
    assert not result.truncated


def test_max_early_zero_only_watches_for_hangup(tcp):
    server, client = tcp
    later(0.05, lambda: client.sendall(b"EHLO x\r\n"))
    result = sleep(server.fileno(), 0.3, max_early=0)
    assert result.outcome is Outcome.ELAPSED
    assert result.early == b"" and result.truncated
    assert read_exactly(server, 8) == b"EHLO x\r\n"


# --- pipes, zero seconds, flags, clock ----------------------------------------

def test_pipe_writer_closing_is_a_disconnect():
    rfd, wfd = os.pipe()
    try:
        def talk_and_close() -> None:
            os.write(wfd, b"HELO x\r\n")
            os.close(wfd)
        later(0.1, talk_and_close)
        result = sleep(rfd, 5.0)
        assert result.outcome is Outcome.DISCONNECTED
        assert result.early == b"HELO x\r\n"
        assert result.elapsed < 1.0
    finally:
        os.close(rfd)


def test_pipe_quiet_writer_elapses():
    rfd, wfd = os.pipe()
    try:
        result = sleep(rfd, 0.2)
        assert result.outcome is Outcome.ELAPSED
    finally:
        os.close(rfd)
        os.close(wfd)


@pytest.mark.parametrize("seconds", [0, 0.0, -1.0])
def test_zero_seconds_returns_at_once(pair, seconds):
    server, _client = pair
    start = time.monotonic()
    result = sleep(server.fileno(), seconds)
    assert time.monotonic() - start < 0.5
    assert result.outcome is Outcome.ELAPSED
    assert result.early == b""


def test_zero_seconds_reports_a_client_already_gone_and_reads_nothing(tcp):
    server, client = tcp
    client.sendall(b"QUIT\r\n")
    client.close()
    time.sleep(0.05)
    result = sleep(server.fileno(), 0)
    assert result.outcome is Outcome.DISCONNECTED
    assert result.early == b""
    assert read_exactly(server, 6) == b"QUIT\r\n"


def test_blocking_mode_is_left_alone(pair):
    server, client = pair
    for blocking in (True, False):
        server.setblocking(blocking)
        before = fcntl.fcntl(server.fileno(), fcntl.F_GETFL)
        later(0.05, lambda: client.sendall(b"x"))
        sleep(server.fileno(), 0.2)
        assert fcntl.fcntl(server.fileno(), fcntl.F_GETFL) == before


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_time_comes_only_from_the_injected_clock(pair):
    server, client = pair
    clock = FakeClock(100.0)

    def tick_and_talk() -> None:
        clock.now = 100.125
        client.sendall(b"NOOP\r\n")

    later(0.05, tick_and_talk)
    result = sleep(server.fileno(), 0.3, clock=clock)
    # The clock stops at 0.125 s: poll waits out the rest for real, but every
    # reported time is the fake clock's.
    assert result.outcome is Outcome.ELAPSED
    assert result.early == b"NOOP\r\n"
    assert result.early_at == 0.125 and result.elapsed == 0.125


def test_a_clock_past_the_deadline_ends_the_sleep_without_waiting(pair):
    server, _client = pair
    ticks = itertools.chain([0.0], itertools.repeat(10.0))  # jumps after start
    start = time.monotonic()
    result = sleep(server.fileno(), 5.0, clock=lambda: next(ticks))
    assert time.monotonic() - start < 0.5
    assert result.outcome is Outcome.ELAPSED and result.elapsed == 10.0


def test_a_stopped_clock_still_ends_when_poll_times_out(pair):
    server, _client = pair
    result = sleep(server.fileno(), 0.2, clock=lambda: 7.0)
    assert result.outcome is Outcome.ELAPSED and result.elapsed == 0.0


# --- no busy loop, signals, errors --------------------------------------------

def test_a_quiet_1s_sleep_uses_almost_no_cpu(pair):
    server, _client = pair
    cpu = time.process_time()
    result = sleep(server.fileno(), 1.0)
    assert result.outcome is Outcome.ELAPSED
    assert time.process_time() - cpu < 0.2


def test_a_truncated_sleep_does_not_spin_on_unread_data(tcp):
    # Past max_early the fd stays readable; we must stop polling for POLLIN.
    server, client = tcp
    client.sendall(b"z" * 10_000)
    time.sleep(0.05)
    cpu = time.process_time()
    result = sleep(server.fileno(), 1.0, max_early=10)
    assert result.truncated and result.outcome is Outcome.ELAPSED
    assert time.process_time() - cpu < 0.2


def test_signals_do_not_cut_the_sleep_short(pair):
    server, _client = pair
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        result = sleep(server.fileno(), 0.4)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert result.outcome is Outcome.ELAPSED
    assert result.elapsed >= 0.39


def test_a_closed_fd_raises_ebadf():
    rfd, wfd = os.pipe()
    os.close(rfd)
    os.close(wfd)
    with pytest.raises(OSError):
        sleep(rfd, 0.1)
    with pytest.raises(OSError):
        sleep(rfd, 0)


@pytest.mark.parametrize("seconds,max_early", [(float("nan"), 10), (float("inf"), 10), (1.0, -1)])
def test_bad_arguments_raise_value_error(pair, seconds, max_early):
    server, _client = pair
    with pytest.raises(ValueError):
        sleep(server.fileno(), seconds, max_early=max_early)


def test_result_is_a_frozen_value():
    result = SleepResult(Outcome.ELAPSED, 1.0)
    with pytest.raises(AttributeError):
        result.elapsed = 2.0  # type: ignore[misc]
    assert not result.pipelined and not result.disconnected
