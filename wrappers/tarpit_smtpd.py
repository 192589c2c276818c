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
import _signal as signal  # not `signal`: it imports enum (~5 ms per connection); same names, plain ints
import sys
import time

USAGE = "usage: tarpit-smtpd [--control DIR] [--config FILE] PROGRAM [ARGS...]\n"
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

    def stop(self, linger: float = 0.0) -> int:
        """Close our end, let the backend exit on its own for up to `linger` s, then TERM, then KILL.

        Return its exit status.  `linger` is the session's: 0 where no message can be
        in flight (tarpit loss, timeout, a dropped client), so every process is gone
        within milliseconds; longer after QUIT or while it may be queueing a message.
        """
        import _socket

        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for sig, wait in ((None, linger), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
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
    from libtarpit.admission import refuse

    return refused(refuse(what, detail), log)


def refused(adm, log) -> int:
    """Carry out a refusing Admission: its log lines, its reply, the end line; return the status."""
    log.write(adm.logs)
    write_client(adm.reply)
    log.event("end", reason=adm.reason)
    return 111 if adm.reason == "tempfail" else 0


def setup(opts: dict[str, str], env: dict[str, str], log, program: list[str]):
    """Admit the client: return (session, slot fd or None, TLS files or None), or an exit status.

    An exit status means the client was refused, or that exec failed (on success
    exec does not return).

    All the decisions are libtarpit.admission's; this does the I/O they ask for:
    reading the configuration, the DNS queries (rDNS, DNSWL), the slot lock, opening the store.
    """
    from libtarpit import admission
    from libtarpit.config import ConfigError
    from libtarpit.controldir import ControlDir

    from tarpit_wrappers.settings import read_config

    try:
        cfg, control_dir, _ = read_config(env, opts.get("control"), opts.get("config"))
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        return tempfail(log, "config", str(e))
    rdns = None
    if admission.wants_rdns(env, cfg):
        from libtarpit.rdns import confirmed_name, parse_server

        servers, port = parse_server(cfg.rdns_server) if cfg.rdns_server else (None, 53)
        rdns = confirmed_name(env["TCPREMOTEIP"], cfg.rdns_timeout, nameservers=servers, port=port)
        log.update(host=rdns[0] or "-")
    lists = ControlDir(control_dir, cfg.state_dir)
    adm = admission.admit(env, cfg, lists, now(), rdns)
    if admission.wants_dnswl(adm, cfg):  # a suspicious client only: the one answer that can change
        from libtarpit.dnswl import lookup_for

        adm = admission.admit(env, cfg, lists, now(), rdns, lookup_for(cfg, adm.client.ip))
    if adm.route == "refuse":
        return refused(adm, log)
    client = adm.client
    log.update(**{"class": client.cls, "rule": "-" if client.rule is None else client.rule})
    slot = None
    if adm.limit > 0:
        slot = take_slot(cfg.state_dir, client.ip, adm.limit, log)
        if slot is False:
            return refused(admission.over_limit(adm), log)
    log.write(adm.logs)
    if adm.route == "exec" and adm.policy.greet_pause <= 0:
        # admission chose exec and there is nothing to wait for: carry it out without
        # importing the session (bench/: ~3 ms per connection on the fast path)
        log.event("connect")
        log.event("exec")
        return exec_backend(program, slot, log)
    greylist = None
    if adm.greylist is not None:
        from libtarpit import greylist as gl

        greylist = gl.Greylist(gl.open_store(cfg.greylist_url, timeout=cfg.greylist_timeout), adm.greylist)
    from libtarpit.session import Session

    tls = None
    if cfg.tls_cert and adm.route == "proxy":
        tls = (cfg.tls_cert, cfg.tls_key or None)
        # a certificate we cannot read is a configuration error (451), as a broken tarpit.toml is;
        # parsing it needs ssl, which is loaded only when a client asks for STARTTLS
        unreadable = [p for p in tls if p and not os.access(p, os.R_OK)]
        if unreadable:
            return tempfail(log, "config", f"{unreadable[0]}: TLS certificate or key not readable")
    session = Session(client, adm.policy, adm.lists, greylist, now(), proxy=adm.route == "proxy",
                      tls=tls is not None)
    return session, slot, tls


def exec_backend(program: list[str], slot: int | None, log) -> int:
    """Replace this process with the backend on the client's fds; return 111 only if exec failed."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if slot is not None:  # the backend keeps the connection slot (its lock survives exec)
        os.set_inheritable(slot, True)
    try:
        os.execvp(program[0], program)
    except OSError as e:
        return tempfail(log, "exec", f"{program[0]}: {e.strerror or e}")


def take_slot(state_dir: str, ip: str, limit: int, log) -> int | None | bool:
    """One of the client's `limit` connection slots: its fd, False when all are taken, None if the lock file failed."""
    from libtarpit.slots import acquire

    try:
        fd = acquire(os.path.join(state_dir, "connections.lock"), ip, limit)
    except OSError as e:  # fail open: a broken state directory must not refuse mail
        log.event("error", what="conn_limit", detail=f"{state_dir}: {e.strerror or e}")
        return None
    return False if fd is None else fd


BUFFER_LIMIT = 256 * 1024  # bytes owed to one side before we stop reading the other
CLOSE_FLUSH = 5.0          # seconds we keep trying to deliver the last replies at close


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


class Client:
    """The client side: raw fds, and the TLS layer once STARTTLS was terminated here."""

    def __init__(self):
        self.out = client_outbox()
        self.tls = None

    def send(self, data: bytes) -> None:
        """Queue `data` for the client (encrypted when TLS is on)."""
        if self.tls is not None:
            self.tls.write(data)
            data = self.tls.outgoing()
        self.out.buf += data

    def receive(self) -> bytes | None:
        """One read: plaintext, b"" on EOF, None when TLS needs more bytes first."""
        raw = read_client()
        if self.tls is None:
            return raw
        plain, failed = self._decrypt(raw)
        if plain:
            return plain
        return b"" if (failed or self.tls.eof or not raw) else None

    def _decrypt(self, raw: bytes | None) -> tuple[bytes, bool]:
        """Feed `raw` (None: nothing new) to TLS; return (plaintext now available, TLS failed).

        Whatever TLS has to say back (an alert, a session ticket) is queued for the client.
        """
        from libtarpit.tls import TLSFailed

        try:
            if raw is not None:
                self.tls.feed(raw)
            plain, failed = self.tls.read(), False
        except TLSFailed:
            plain, failed = b"", True
        self.out.buf += self.tls.outgoing()
        return plain, failed

    def handshake(self, files, reply: bytes, timeout: float) -> tuple[bool, str]:
        """Load the certificate, send `reply`, run the TLS handshake (bounded by `timeout`); return (ok, detail).

        A certificate that does not load: (False, "certificate: ..."), and `reply` is not sent.
        """
        from libtarpit.errors import ControlError
        from libtarpit.tls import ServerTLS, TLSFailed, load_context

        try:
            tls = ServerTLS(load_context(*files))
        except ControlError as e:
            return False, f"certificate: {e}"
        self.out.buf += reply
        end = now() + timeout
        try:
            while not tls.handshake():
                self.out.buf += tls.outgoing()
                if not self._drain(end):
                    return False, "client gone"
                ready, _, _ = select.select([CLIENT_IN], [], [], max(0.0, end - now()))
                if not ready:
                    return False, "handshake timeout"
                raw = read_client()
                if not raw:
                    return False, "client closed during handshake"
                tls.feed(raw)
        except TLSFailed as e:
            self.out.buf += tls.outgoing()
            self._drain(end)
            return False, e.reason
        self.out.buf += tls.outgoing()
        self.tls = tls
        version, cipher = tls.info()
        return True, f"{version} {cipher}"

    def _drain(self, end: float) -> bool:
        while self.out.buf:
            if not self.out.flush():
                return False
            if self.out.buf:
                select.select([], [CLIENT_OUT], [], max(0.0, end - now()))
                if now() >= end:
                    return False
        return True

    def decrypt_early(self, result):
        """The SleepResult with its early bytes (TLS records) decrypted; a close_notify is no command."""
        return result._replace(early=self._decrypt(result.early)[0])

    def pending_plain(self) -> bytes:
        """Plaintext TLS already decrypted and buffered (read at once after the handshake)."""
        return self._decrypt(None)[0] if self.tls is not None else b""


def run(session, program: list[str], log, slot: int | None = None, tls_files=None) -> int:
    """Carry out the session's actions until it closes; return the exit status."""
    from libtarpit import actions as A

    backend: Backend | None = None
    client: Client | None = None
    to_backend = None
    todo = list(session.start())
    while True:
        while todo:
            a = todo.pop(0)
            if isinstance(a, A.Log):
                log.write((a,))
            elif isinstance(a, A.SendClient):
                client = client or Client()
                client.send(a.data)
            elif isinstance(a, A.SendBackend) and to_backend is not None:
                to_backend.buf += a.data
            elif isinstance(a, A.Sleep):
                if client is not None:
                    client.out.flush()  # replies owed before the held command go out first
                from libtarpit.sleep import sleep

                result = sleep(CLIENT_IN, a.seconds)
                if client is not None and client.tls is not None and result.early:
                    result = client.decrypt_early(result)  # what the client sent in TLS, as plaintext
                todo[:0] = session.sleep_done(result, now())
            elif isinstance(a, A.StartBackend):
                try:
                    backend = Backend(program)
                except OSError as e:
                    todo[:0] = session.fail("backend", f"{program[0]}: {e.strerror or e}")
                    continue
                backend.sock.setblocking(False)
                to_backend = Outbox(backend.sock.send)
            elif isinstance(a, A.StartTLS):
                client = client or Client()
                ok, detail = client.handshake(tls_files, a.reply, session.policy.idle_timeout or 60.0)
                todo[:0] = session.tls_done(ok, detail, now())
                more = client.pending_plain() if ok else b""
                if more:
                    todo += session.client_data(more, now())
            elif isinstance(a, A.Passthrough):
                client = client or Client()
                todo[:0] = passthrough(session, client, backend, to_backend)
            elif isinstance(a, A.Exec):
                return exec_backend(program, slot, log)
            elif isinstance(a, A.Close):
                return close(a, client, backend, log)
        if client is not None and not client.out.flush():
            todo = session.client_gone(now())
        elif to_backend is not None and not to_backend.flush():
            todo = session.backend_data(b"", now())
        else:
            todo = wait(session, backend, client, to_backend)


def passthrough(session, client: Client, backend: Backend, to_backend: Outbox) -> list:
    """Copy bytes both ways unread (TLS we do not terminate) until a side closes; return the session's actions."""
    out = client.out
    bfd = backend.sock.fileno()
    while True:
        if not out.flush():
            return session.client_gone(now())
        if not to_backend.flush():
            return session.backend_data(b"", now())
        readable = ([CLIENT_IN] if not to_backend.full else []) + ([bfd] if not out.full else [])
        writable = ([CLIENT_OUT] if out.buf else []) + ([bfd] if to_backend.buf else [])
        ready, _, _ = select.select(readable, writable, [])
        if bfd in ready:
            try:
                data = backend.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                return session.backend_data(b"", now())
            if data:
                out.buf += data
        if CLIENT_IN in ready:
            data = read_client()
            if not data:
                return session.client_data(b"", now())
            to_backend.buf += data


def close(action, client: Client | None, backend: Backend | None, log) -> int:
    """Deliver the last replies (bounded), let the backend exit, write the end line; return the status."""
    end = now() + CLOSE_FLUSH
    out = client.out if client is not None else None
    while out is not None and out.buf and out.flush() and now() < end:
        select.select([], [CLIENT_OUT], [], max(0.0, end - now()))
    if backend is not None:
        status = backend.stop(action.linger)
        if status and action.linger > 0:  # with no linger we stopped it ourselves: its status says nothing
            log.event("error", what="backend", detail=f"exited with status {status}")
    log.event("end", **dict(action.fields))
    return action.status


def wait(session, backend: Backend | None, client: Client | None, to_backend: Outbox | None) -> list:
    """Block until a side has bytes for us or room for ours, or a deadline; return the session's actions."""
    bfd = backend.sock.fileno() if backend is not None else None
    out = client.out if client is not None else None
    readable = []
    if session.wants_client() and not (to_backend is not None and to_backend.full):
        readable.append(CLIENT_IN)
    if bfd is not None and not (out is not None and out.full):
        readable.append(bfd)
    writable = ([CLIENT_OUT] if out is not None and out.buf else []) \
        + ([bfd] if to_backend is not None and to_backend.buf else [])
    deadline = session.deadline()
    if out is not None and out.buf:  # a client that does not read is idle too
        stall = out.stalled_since + session.policy.idle_timeout
        deadline = stall if deadline is None else min(deadline, stall)
    timeout = None if deadline is None else max(0.0, deadline - now())
    ready, room, _ = select.select(readable, writable, [], timeout)
    if not ready and not room:
        return session.timeout(now())
    acts: list = []
    if bfd is not None and bfd in ready:
        try:
            acts += session.backend_data(backend.sock.recv(65536), now())
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            acts += session.backend_data(b"", now())
    # the backend's reply may have started a sleep (tarpit, error pause) or closed the session:
    # then the client is not read this round (the session takes no client bytes while sleeping)
    if CLIENT_IN in ready and session.wants_client():
        if client is None:
            data = read_client()
        else:
            data = client.receive()
        if data is not None:
            acts += session.client_data(data, now())
    return acts


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, 100 usage, 111 temporary)."""
    from libtarpit.log import EventLog

    argv = sys.argv[1:] if argv is None else argv
    from tarpit_wrappers.about import about

    answered = about(argv, "tarpit-smtpd", USAGE + "       tarpit-smtpd serve [tcpserver's options] HOST PORT PROGRAM [ARGS...]\n",
                     "The tcpserver-spawned wrapper (or, with serve, the listener in tcpserver's place)\n"
                     "that puts S25R, the tarpit, taRgrey, badheloarg and rcptusers in front of PROGRAM.")
    if answered is not None:
        return answered
    from libtarpit.procenv import undo_locale_coercion

    undo_locale_coercion()  # the backend gets tcpserver's environment, not the one Python made
    if argv[:1] == ["serve"]:  # the listener: tcpserver's job too, many clients in one process
        from tarpit_wrappers.serve import main as serve

        return serve(argv[1:])
    parsed = parse_args(argv)
    if parsed is None:
        sys.stderr.write(USAGE)
        return 100
    opts, program = parsed
    env = dict(os.environ)  # read once: the log fields and admission use this copy
    pid = os.getpid()
    log = EventLog(sys.stderr, {
        "conn": f"{int(time.time() * 1000) % 10**10:x}.{pid}", "pid": pid,
        "ip": env.get("TCPREMOTEIP", "-"), "host": env.get("TCPREMOTEHOST") or "-",
        "class": "-", "rule": "-",
    })
    session = None
    try:
        made = setup(opts, env, log, program)
        if isinstance(made, int):
            return made
        session, slot, tls_files = made
        return run(session, program, log, slot, tls_files)
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
