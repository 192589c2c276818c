"""tarpit-smtpd: the tcpserver-spawned wrapper in front of an SMTP server.

    tcpserver -vRl0 -x tcp.smtp.cdb 0 25 tarpit-smtpd [--control DIR] [--config FILE] PROGRAM [ARGS...]

The client socket is fd 0 (read) and fd 1 (write).  The wrapper reads the
tcpserver environment once, classifies the client, and then either execs
PROGRAM on the same fds (fast path: nothing of ours stays behind) or starts it
on a socketpair and relays, carrying out what libtarpit.session decides.

This file owns every socket, process and clock; it holds no policy.
Exit status: 0 when the session ended normally, 100 for usage errors, 111 for
temporary trouble (our own failure, a backend that could not start).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

USAGE = "usage: tarpit-smtpd [--control DIR] [--config FILE] PROGRAM [ARGS...]\n"
TEMPFAIL = b"451 4.3.0 Temporary local problem, please try again later\r\n"
TOO_MANY = b"421 4.7.0 Too many connections from your address, try again later\r\n"
CLIENT_IN, CLIENT_OUT = 0, 1


def now() -> float:
    """The one clock of the wrapper (wall time; the session also uses it for greylist records)."""
    return time.time()


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """Return (options, program argv) or None on a usage error.  No argparse: start-up is paid per mail."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        if argv[i] == "--":
            i += 1
            break
        name, eq, value = argv[i][2:].partition("=")
        if name not in ("control", "config"):
            return None
        if not eq:
            i += 1
            if i >= len(argv):
                return None
            value = argv[i]
        opts[name] = value
        i += 1
    program = argv[i:]
    return (opts, program) if program else None


class Backend:
    """The backend process on one end of a socketpair."""

    def __init__(self, program: list[str]):
        import _socket  # the C module: `socket` costs 0.6 MB per held connection (bench/)

        ours, theirs = _socket.socketpair()
        try:
            self.pid = os.posix_spawnp(
                program[0], program, os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0),
                              (os.POSIX_SPAWN_DUP2, theirs.fileno(), 1)],
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        finally:
            theirs.close()
        self.sock = ours
        self.status: int | None = None

    def stop(self, at_once: bool = False) -> int:
        """Close our end, give the backend a moment to exit on EOF, then TERM, then KILL; return its status.

        `at_once` skips the moment: for sessions that ended where no message can be in
        flight (tarpit loss, timeout, a dropped client), so every process is gone within
        milliseconds of the client's close.
        """
        import _socket

        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        steps = ((None, 0.05), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0))
        for sig, wait in steps[1:] if at_once else steps:
            if sig is not None:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
            if self._wait(wait):
                break
        return self.status or 0

    def _wait(self, seconds: float) -> bool:
        try:
            fd = os.pidfd_open(self.pid)
        except (OSError, AttributeError):
            fd = None
        try:
            if fd is not None:
                select.select([fd], [], [], seconds)
            pid, status = os.waitpid(self.pid, os.WNOHANG if fd is not None else 0)
            if pid == 0:
                return False
            self.status = os.waitstatus_to_exitcode(status)
            return True
        except ChildProcessError:
            return True
        finally:
            if fd is not None:
                os.close(fd)


def write_client(data: bytes) -> bool:
    """Write all of `data` to the client; False when the client has gone."""
    view = memoryview(data)
    try:
        while view:
            n = os.write(CLIENT_OUT, view)
            view = view[n:]
        return True
    except OSError:
        return False


def read_client() -> bytes:
    """One read from the client; b"" on EOF or reset."""
    try:
        return os.read(CLIENT_IN, 65536)
    except OSError:
        return b""


def tempfail(log, what: str, detail: str) -> int:
    """Answer 451, log one error line, exit 111: for failures before a session exists."""
    log.event("error", what=what, detail=detail)
    write_client(TEMPFAIL)
    log.event("end", reason="tempfail")
    return 111


def setup(opts: dict[str, str], env: dict[str, str], log):
    """Read configuration, control files and classify: return (session, slot fd or None) or an exit status."""
    from libtarpit.config import ConfigError
    from libtarpit.errors import ControlError
    from libtarpit.client import classify

    from tarpit_wrappers.settings import read_config

    try:
        cfg, control_dir, _ = read_config(env, opts.get("control"), opts.get("config"))
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        return tempfail(log, "config", str(e))
    ip = env.get("TCPREMOTEIP", "")
    host = env.get("TCPREMOTEHOST") or None
    relay = "RELAYCLIENT" in env
    # A name from tcpserver is trusted when it ran with -p (TARPIT_TRUST_HOST=1, the default);
    # with TARPIT_RDNS=1 we confirm the name ourselves when it is missing or not trusted.
    name_trusted = cfg.trust_host
    if cfg.rdns and ip and (host is None or not name_trusted) and not relay:
        from libtarpit.rdns import confirmed_name, parse_server

        servers, port = parse_server(cfg.rdns_server) if cfg.rdns_server else (None, 53)
        host, err = confirmed_name(ip, cfg.rdns_timeout, nameservers=servers, port=port)
        name_trusted = True
        if err:
            log.event("error", what="rdns", detail=err)
        log.update(host=host or "-")
    try:
        verdict = None
        if not relay or cfg.force_class:
            # RELAYCLIENT makes the client trusted whatever S25R says: skip the rules and
            # the allow-list (and a broken allow-list does not lock out our own users)
            from libtarpit import s25r

            allow = s25r.AllowList.load(os.path.join(control_dir, "s25r-allow"))
            verdict = s25r.classify(host, ip, allow, extra=cfg.s25r_extra, name_trusted=name_trusted)
        key = ip
        client = classify(ip, host, relayclient=relay, verdict=verdict,
                          force_class=cfg.force_class)
        policy = cfg.policy(client.cls)
        from libtarpit.session import Lists

        lists = Lists(
            load_list(control_dir, "badheloarg") if policy.helo_check else None,
            load_list(control_dir, "rcptusers") if policy.rcpt_check else None,
        )
    except ControlError as e:
        return tempfail(log, "control", str(e))
    greylist = None
    if policy.greylist != "off":
        from libtarpit import greylist as gl

        params = gl.GreylistParams(mode=policy.greylist, delay=cfg.greylist_delay,
                                   retry_count=cfg.greylist_retries, auto_whitelist=cfg.greylist_whitelist,
                                   expire=cfg.greylist_expire, key=cfg.greylist_key,
                                   timeout=cfg.greylist_timeout, ipv4_prefix=cfg.greylist_ipv4_prefix,
                                   ipv6_prefix=cfg.greylist_ipv6_prefix,
                                   greylist_normal=client.cls != "suspicious" and policy.greylist == "greylist")
        key = gl.client_key(ip, host if name_trusted else None, params)
        greylist = gl.Greylist(gl.open_store(cfg.greylist_url, timeout=cfg.greylist_timeout), params)
    from libtarpit.session import Session

    client = client._replace(key=key)
    log.update(**{"class": client.cls, "rule": "-" if client.rule is None else client.rule})
    slot = None
    if policy.max_per_ip > 0 and ip:
        slot = take_slot(cfg.state_dir, ip, policy.max_per_ip, log)
        if slot is False:
            log.event("connect")
            log.event("conn_limit", limit=policy.max_per_ip)
            write_client(TOO_MANY)
            log.event("end", reason="conn_limit")
            return 0
    return Session(client, policy, lists, greylist, now()), slot


def take_slot(state_dir: str, ip: str, limit: int, log) -> int | None | bool:
    """One of the client's `limit` connection slots: its fd, False when all are taken, None if the lock file failed."""
    from libtarpit.slots import acquire

    try:
        fd = acquire(os.path.join(state_dir, "connections.lock"), ip, limit)
    except OSError as e:  # fail open: a broken state directory must not refuse mail
        log.event("error", what="conn_limit", detail=f"{state_dir}: {e.strerror or e}")
        return None
    return False if fd is None else fd


def load_list(directory: str, name: str):
    """The control list `name`, or None when absent (ControlError when unreadable)."""
    path = os.path.join(directory, name)
    if not (os.path.lexists(path) or os.path.lexists(path + ".cdb")):
        return None  # the common case: skip importing control (and cdblib) at all
    from libtarpit import control

    return control.ControlList.load(directory, name)


BUFFER_LIMIT = 256 * 1024  # bytes owed to one side before we stop reading the other
CLOSE_FLUSH = 5.0          # seconds we keep trying to deliver the last replies at close
# session ends after which no message can be half-way through the backend
NOTHING_IN_FLIGHT = frozenset({"tarpit_lost", "greet_lost", "pregreet", "timeout", "too_many_errors", "policy"})


class Outbox:
    """Bytes owed to one side, written without blocking as the side accepts them.

    A peer that stops reading must not stop us: writes never block, the caller
    stops reading the other side while `full`, and `stalled_since` lets the
    idle timeout cover a client that neither talks nor reads.
    """

    def __init__(self, send):
        self.buf = bytearray()
        self._send = send
        self.gone = False
        self.stalled_since = now()

    @property
    def full(self) -> bool:
        return len(self.buf) >= BUFFER_LIMIT

    def flush(self) -> bool:
        """Write what the peer takes now; False once the peer has gone."""
        while self.buf and not self.gone:
            try:
                n = self._send(self.buf)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self.gone = True
                self.buf.clear()
                return False
            del self.buf[:n]
            self.stalled_since = now()
        return not self.gone


def client_outbox() -> Outbox:
    """The client's Outbox: MSG_DONTWAIT sends on a socket, plain writes on anything else."""
    import _socket

    fd = os.dup(CLIENT_OUT)
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:  # not a socket (a pipe, a terminal): plain writes
        os.close(fd)
        return Outbox(lambda buf: os.write(CLIENT_OUT, buf))
    return Outbox(lambda buf: sock.send(buf, _socket.MSG_DONTWAIT))


def run(session, program: list[str], log, slot: int | None = None) -> int:
    """Carry out the session's actions until it closes; return the exit status."""
    from libtarpit import session as S

    backend: Backend | None = None
    to_client = to_backend = None
    todo = list(session.start())
    while True:
        while todo:
            a = todo.pop(0)
            if isinstance(a, S.Log):
                log.event(a.event, **dict(a.fields))
            elif isinstance(a, S.SendClient):
                to_client = to_client or client_outbox()
                to_client.buf += a.data
            elif isinstance(a, S.SendBackend) and to_backend is not None:
                to_backend.buf += a.data
            elif isinstance(a, S.Sleep):
                if to_client is not None:
                    to_client.flush()  # replies owed before the held command go out first
                from libtarpit.sleep import sleep

                result = sleep(CLIENT_IN, a.seconds)
                todo[:0] = session.sleep_done(result, now())
            elif isinstance(a, S.StartBackend):
                try:
                    backend = Backend(program)
                except OSError as e:
                    todo[:0] = session.fail("backend", f"{program[0]}: {e.strerror or e}")
                    continue
                backend.sock.setblocking(False)
                to_backend = Outbox(backend.sock.send)
            elif isinstance(a, S.Exec):
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                if slot is not None:  # the backend keeps the connection slot (its lock survives exec)
                    os.set_inheritable(slot, True)
                try:
                    os.execvp(program[0], program)
                except OSError as e:
                    return tempfail(log, "exec", f"{program[0]}: {e.strerror or e}")
            elif isinstance(a, S.Close):
                return close(a, to_client, backend, log)
        if to_client is not None and not to_client.flush():
            todo = session.client_gone(now())
        elif to_backend is not None and not to_backend.flush():
            todo = session.backend_data(b"", now())
        else:
            todo = wait(session, backend, to_client, to_backend)


def close(action, to_client: Outbox | None, backend: Backend | None, log) -> int:
    """Deliver the last replies (for a bounded time), stop the backend; return the exit status."""
    end = now() + CLOSE_FLUSH
    while to_client is not None and to_client.buf and to_client.flush() and now() < end:
        select.select([], [CLIENT_OUT], [], max(0.0, end - now()))
    if backend is not None:
        status = backend.stop(at_once=action.reason in NOTHING_IN_FLIGHT)
        if action.reason == "backend_closed" and status:
            log.event("error", what="backend", detail=f"exited with status {status}")
    return action.status


def wait(session, backend: Backend | None, to_client: Outbox | None, to_backend: Outbox | None) -> list:
    """Block until a side has bytes for us or room for ours, or a deadline; return the session's actions."""
    bfd = backend.sock.fileno() if backend is not None else None
    readable = []
    if session.wants_client() and not (to_backend is not None and to_backend.full):
        readable.append(CLIENT_IN)
    if bfd is not None and not (to_client is not None and to_client.full):
        readable.append(bfd)
    writable = ([CLIENT_OUT] if to_client is not None and to_client.buf else []) \
        + ([bfd] if to_backend is not None and to_backend.buf else [])
    deadline = session.deadline()
    if to_client is not None and to_client.buf:  # a client that does not read is idle too
        stall = to_client.stalled_since + session.policy.idle_timeout
        deadline = stall if deadline is None else min(deadline, stall)
    timeout = None if deadline is None else max(0.0, deadline - now())
    ready, room, _ = select.select(readable, writable, [], timeout)
    if not ready and not room:
        return session.timeout(now())
    out: list = []
    if bfd is not None and bfd in ready:
        try:
            out += session.backend_data(backend.sock.recv(65536), now())
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            out += session.backend_data(b"", now())
    if CLIENT_IN in ready and session.phase != "closed":
        out += session.client_data(read_client(), now())
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, 100 usage, 111 temporary)."""
    from libtarpit.log import EventLog

    parsed = parse_args(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        sys.stderr.write(USAGE)
        return 100
    opts, program = parsed
    env = os.environ
    pid = os.getpid()
    log = EventLog(sys.stderr, {
        "conn": f"{int(time.time() * 1000) % 10**10:x}.{pid}", "pid": pid,
        "ip": env.get("TCPREMOTEIP", "-"), "host": env.get("TCPREMOTEHOST") or "-",
        "class": "-", "rule": "-",
    })
    session = None
    try:
        made = setup(opts, dict(env), log)
        if isinstance(made, int):
            return made
        session, slot = made
        return run(session, program, log, slot)
    except Exception as e:  # our own bug: 451, one line, never a traceback on the socket
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb else "?"
        return tempfail(log, "internal", f"{type(e).__name__} at {where}: {e}")


def entry() -> None:
    """Console-script entry: run, flush the log, and leave without interpreter shutdown.

    Tearing the interpreter down costs more than the rest of the exit (bench/):
    every socket and the backend are already closed and reaped by then.
    """
    status = main()
    try:
        sys.stderr.flush()
    finally:
        os._exit(status)


if __name__ == "__main__":
    entry()
