"""tarpit-smtpd serve: tcpserver's job and the wrapper's in one process, many clients at once.

    tarpit-smtpd serve [tcpserver's options] HOST PORT PROGRAM [ARGS...]

A drop-in for `tcpserver ... tarpit-smtpd PROGRAM`: the same option letters
(libtarpit.serveargs), the same tcprules CDB (libtarpit.tcprules), the same
environment for PROGRAM.  Each client is admitted by libtarpit.admission and
then either gets the backend exec'd on its own socket (a child with the socket
as fds 0 and 1: nothing of ours in between) or is held and relayed by a
libtarpit.session inside this one event loop.  No policy lives here: this file
moves bytes, runs timers and processes, and writes log lines.

Log lines are the wrapper's (one logfmt line per event, `end` last), plus
tcpserver-like status lines ("tarpit-smtpd serve: status: N/C") under -v.

Signals: SIGHUP reads tarpit.toml again (control lists and the rules CDB are
read per connection anyway); SIGTERM stops accepting and lets the sessions held
here finish, up to DRAIN seconds; SIGUSR1 writes one snapshot line (sessions
per phase and class, backends running).  Over -c, or over --backends when a
backend is due, a client gets 421.

Long options (serve's own): --workers=N processes share the port, each source
address steered to one of them by the kernel (so the per-IP cap, counted in
memory, stays exact), -c and --backends counted across all of them in shared
memory; --daemon detaches with python-daemon (--pidfile, --log for stderr).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


DRAIN = 60.0  # seconds SIGTERM lets the sessions held here finish
TOO_BUSY = b"421 4.3.2 Too many connections, try again later\r\n"
LONG_OPTIONS = ("control=", "config=", "workers=", "backends=", "daemon", "pidfile=", "log=")
PIDFILE = "/run/tarpit-smtpd.pid"
LOGFILE = "/var/log/tarpit-smtpd.log"
BACKEND_BUFFER = 1 << 20  # bytes on the way to the backend before its client waits
SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h; not in the socket module


def now() -> float:
    """The listener's one clock (wall time: greylist records are shared with the wrapper)."""
    return time.time()


class Counter:
    """A count kept per worker in memory every worker shares (inherited across fork).

    Each worker writes only its own slot, so no lock is needed; a limit reads the sum, and the
    supervisor zeroes a dead worker's slot before it starts its successor.
    """

    __slots__ = ("_mem", "slot")

    def __init__(self, workers: int = 1):
        import mmap

        self._mem = memoryview(mmap.mmap(-1, 8 * workers)).cast("q")  # MAP_SHARED|MAP_ANONYMOUS
        self.slot = 0

    def add(self, n: int) -> None:
        self._mem[self.slot] += n

    def mine(self) -> int:
        """This worker's count."""
        return self._mem[self.slot]

    def total(self) -> int:
        """Every worker's count together."""
        return sum(self._mem)

    def reset(self, slot: int) -> None:
        self._mem[slot] = 0


class Children:
    """Every child we start, reaped on SIGCHLD: its owner's `exited(status)` is then called.

    The owner itself, not a future with a callback: that pair was ~0.4 KB of every held client."""

    def __init__(self, loop: asyncio.AbstractEventLoop, running: Counter):
        self.loop = loop
        self.owners: dict[int, Connection] = {}
        self.running = running  # backends running, across workers (--backends)
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def spawn(self, program: list[str], env: dict[str, str], fd: int, owner: Connection) -> int:
        """Start `program` with `fd` as its stdin and stdout for `owner`; return its pid (OSError
        if it cannot start)."""
        pid = os.posix_spawnp(program[0], program, env,
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM,
                                         signal.SIGHUP, signal.SIGUSR1))
        self.owners[pid] = owner
        self.running.add(1)
        return pid

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            owner = self.owners.pop(pid, None)
            if owner is not None:
                self.running.add(-1)
                owner.exited(os.waitstatus_to_exitcode(status))


class Side(asyncio.Protocol):
    """The client's socket: bytes in go to the connection's `from_client`, EOF to `client_eof`,
    and `client_filled(True/False)` when what we write to it piles up past asyncio's high-water
    mark (64 KiB) and when it has drained: the backend is not read meanwhile.

    It keeps the connection, not three bound methods: 0.4 KB less per held client."""

    __slots__ = ("conn", "transport")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.conn.from_client(data)

    def eof_received(self) -> bool:
        self.conn.client_eof()
        return True  # keep our write side open: replies owed after a half-close still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.client_eof()

    def pause_writing(self) -> None:
        self.conn.client_filled(True)

    def resume_writing(self) -> None:
        self.conn.client_filled(False)


class BackendSide:
    """The backend's end of the socketpair, read and written straight from the selector.

    Not an asyncio transport: a transport is ~0.8 KB, and a client held in the RCPT tarpit
    keeps its backend's socket for as long as it is held.  It offers the few transport
    methods the connection needs (write, pause_reading, resume_reading, close, is_closing) and
    calls the connection's from_backend, backend_eof and backend_filled.  Up to BACKEND_BUFFER
    bytes may wait to be written before the client is paused (asyncio's 64 KiB would pause it
    on every 256 KiB read of a message body)."""

    __slots__ = ("conn", "sock", "buf", "state")

    # state bits
    READING, FULL, CLOSING, CLOSED = 1, 2, 4, 8

    def __init__(self, conn: Connection, sock: socket.socket):
        self.conn, self.sock = conn, sock
        self.buf = bytearray()
        self.state = 0
        sock.setblocking(False)
        self.resume_reading()

    def is_closing(self) -> bool:
        return bool(self.state & (self.CLOSING | self.CLOSED))

    def resume_reading(self) -> None:
        if not self.state & (self.READING | self.CLOSING | self.CLOSED):
            self.state |= self.READING
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self.readable)

    def pause_reading(self) -> None:
        if self.state & self.READING:
            self.state &= ~self.READING
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def readable(self) -> None:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # a reset is an end, as asyncio's transport reports it
        if data:
            return self.conn.from_backend(data)
        self.pause_reading()
        self.conn.backend_eof()

    def write(self, data: bytes) -> None:
        if self.state & (self.CLOSING | self.CLOSED) or not data:
            return
        if not self.buf:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # it is gone: its end of file reaches the session through the read side
            if sent == len(data):
                return
            data = data[sent:]
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self.writable)
        self.buf += data
        if len(self.buf) > BACKEND_BUFFER and not self.state & self.FULL:
            self.state |= self.FULL
            self.conn.backend_filled(True)

    def writable(self) -> None:
        try:
            sent = self.sock.send(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.buf)  # it is gone: drop what it will never read
        del self.buf[:sent]
        if self.buf:
            return
        asyncio.get_running_loop().remove_writer(self.sock.fileno())
        if self.state & self.CLOSING:
            return self.shut()
        if self.state & self.FULL:
            self.state &= ~self.FULL
            self.conn.backend_filled(False)

    def close(self) -> None:
        """Stop reading; close once what is buffered has been written."""
        if self.state & (self.CLOSING | self.CLOSED):
            return
        self.pause_reading()
        self.state |= self.CLOSING
        if not self.buf:
            self.shut()

    def shut(self) -> None:
        self.state = self.CLOSED
        self.sock.close()


class Connection:
    """One client: admission, then exec or a session driven by this loop's events."""

    __slots__ = ("listener", "sock", "peer", "local", "client", "backend", "backend_pid", "backend_status", "closing",
                 "session", "log", "sleeping", "timer", "timer_at", "tls", "tls_pending", "tls_files", "pipe", "done",
                 "ip", "env", "client_full", "__weakref__")

    def __init__(self, listener: Listener, sock: socket.socket, peer: tuple, local: tuple):
        self.listener = listener
        self.sock = sock
        self.peer, self.local = peer, local
        self.client: Side | None = None
        self.backend: BackendSide | None = None
        self.backend_pid = 0
        self.backend_status: int | None = None  # its exit status, once reaped
        self.closing: Any = None                # the Close action waiting for the backend to exit
        self.tls_pending: Any = None            # the TLS layer while its handshake runs
        self.session: Any = None
        self.log: Any = None
        self.sleeping: list | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None  # the session deadline self.timer is armed for (None: another use)
        self.tls: Any = None
        self.tls_files: Any = None
        self.pipe = False
        self.client_full = False  # our writes to the client wait in its transport
        self.done = 0  # 1: counted against the per-IP cap; 2: over (see finish)
        self.ip = ""

    # --- start ------------------------------------------------------------

    async def run(self) -> None:
        """Admit, then exec or relay until the session closes."""
        from libtarpit import admission
        from libtarpit.log import EventLog

        L = self.listener
        env = await self.environment()
        self.peer = self.local = None  # in the environment now; not kept for as long as it is held
        if env is None:
            self.sock.close()
            return self.finish()
        pid = os.getpid()
        self.log = EventLog(sys.stderr, {
            "conn": f"{int(time.time() * 1000) % 10**10:x}.{pid}.{id(self) % 10**6}", "pid": pid,
            "ip": env.get("TCPREMOTEIP", "-"), "host": env.get("TCPREMOTEHOST") or "-",
            "class": "-", "rule": "-"})
        try:
            cfg = L.config(env)
        except Exception as e:  # a bad value set by a tcprules variable: 451, as the wrapper
            return self.refused(admission.refuse("config", str(e)))
        lists = L.lists(cfg)
        adm = admission.admit(env, cfg, lists, now(), None)
        if admission.wants_dnswl(adm, cfg):  # S25R made it suspicious: the one answer that can change that
            from libtarpit.dnswl import lookup_for_async

            adm = admission.admit(env, cfg, lists, now(), None, await lookup_for_async(cfg, adm.client.ip))
        if adm.route == "refuse":
            return self.refused(adm)
        c = adm.client
        self.log.update(**{"class": c.cls, "rule": "-" if c.rule is None else c.rule})
        if adm.limit > 0 and L.per_ip.get(self.ip, 0) >= adm.limit:
            return self.refused(admission.over_limit(adm))  # the per-IP cap: a count, no lock file
        self.log.write(adm.logs)
        L.per_ip[self.ip] = L.per_ip.get(self.ip, 0) + 1
        self.done = 1
        await self.relay(adm, cfg, env)
        # returns with the session running on callbacks alone: no frame keeps the environment,
        # the Config or the Admission alive for as long as a client is held

    async def environment(self) -> dict[str, str] | None:
        """tcpserver's environment for this client, with its tcprules entry applied; None: deny."""
        L, a = self.listener, self.listener.args
        ip, port = self.peer[0], self.peer[1]
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
        self.ip = ip
        env = dict(L.base_env)
        env.update(PROTO="TCP", TCPLOCALIP=self.local[0].removeprefix("::ffff:"), TCPLOCALPORT=str(self.local[1]),
                   TCPREMOTEIP=ip, TCPREMOTEPORT=str(port))
        env["TCPLOCALHOST"] = a.local_host if a.local_host is not None else socket.gethostname()
        host = info = None
        if a.remote_host:
            host = await L.reverse(ip)
        if host:
            env["TCPREMOTEHOST"] = host
        else:
            env.pop("TCPREMOTEHOST", None)
        if a.remote_info:
            info = await ident(self.local, self.peer, a.timeout)
        if info is not None:
            env["TCPREMOTEINFO"] = info
        else:
            env.pop("TCPREMOTEINFO", None)
        if a.rules:
            from libtarpit import tcprules
            from libtarpit.errors import ControlError

            try:
                rule = tcprules.lookup(a.rules, ip, host, info)
            except ControlError as e:
                L.say(f"dropping connection, unable to read {e}")
                return None
            if rule is not None and rule.action == "deny":
                if a.banner:
                    self.sock.send(a.banner.encode("latin-1"))
                L.say(f"deny {ip}")
                return None
            env = tcprules.apply(env, rule)
        return env

    def refused(self, adm) -> None:
        """A refusing Admission: its log lines, its reply, the end line."""
        self.log.write(adm.logs)
        try:
            self.sock.setblocking(False)
            self.sock.send(adm.reply)
        except OSError:
            pass
        self.sock.close()
        self.log.event("end", reason=adm.reason)
        self.finish()

    # --- the session ---------------------------------------------------------

    async def relay(self, adm, cfg, env: dict[str, str]) -> None:
        from libtarpit.session import Session

        greylist = None
        if adm.greylist is not None:
            from libtarpit import greylist as gl

            greylist = gl.Greylist(self.listener.store(cfg), adm.greylist)
        if cfg.tls_cert and adm.route == "proxy":
            self.tls_files = (cfg.tls_cert, cfg.tls_key or None)
        self.env = self.listener.difference(env)
        self.session = Session(adm.client, adm.policy, adm.lists, greylist, now(),
                               proxy=adm.route == "proxy", tls=self.tls_files is not None,
                               full=self.listener.full if self.listener.backend_limit else None)
        loop = asyncio.get_running_loop()
        _, self.client = await loop.connect_accepted_socket(
            lambda: Side(self), self.sock)
        self.client.transport.pause_reading()  # nothing is read before the session asks for it
        self.act(self.session.start())

    def act(self, actions: list) -> None:
        """Carry out the session's actions in order."""
        from libtarpit import actions as A

        todo = list(actions)
        while todo:
            a = todo.pop(0)
            if isinstance(a, A.Log):
                self.log.write((a,))
            elif isinstance(a, A.SendClient):
                self.to_client(a.data)
            elif isinstance(a, A.SendBackend):
                if self.backend is not None:
                    self.backend.write(a.data)
            elif isinstance(a, A.Sleep):
                self.start_sleep(a.seconds)
            elif isinstance(a, A.StartBackend):
                todo[:0] = self.start_backend()
            elif isinstance(a, A.Exec):
                return self.exec_backend()
            elif isinstance(a, A.StartTLS):
                todo[:0] = self.start_tls(a.reply)
            elif isinstance(a, A.Passthrough):
                self.pipe = True
            elif isinstance(a, A.Close):
                return self.close(a)
        self.schedule()

    def schedule(self) -> None:
        """Read the client only while the session wants it; arm the deadline."""
        s = self.session
        if self.client is None or self.client.transport is None or self.sleeping is not None:
            return
        if s.phase == "closed":
            return
        if s.phase == "tls":  # the handshake reads the client; its own timer bounds it
            self.client.transport.resume_reading()
            return
        backend_full = self.backend is not None and self.backend.state & BackendSide.FULL
        if (self.pipe or s.wants_client()) and not backend_full:
            self.client.transport.resume_reading()
        else:
            self.client.transport.pause_reading()
        deadline = None if self.pipe else s.deadline()
        if deadline is not None and self.timer_at is not None and self.timer_at <= deadline:
            return  # armed no later than needed: due() looks again (no timer per event)
        self.set_timer(None if deadline is None else deadline - now(), self.due, at=deadline)

    def set_timer(self, delay: float | None, callback=None, *args, at: float | None = None) -> None:
        """Cancel the connection's one timer and, given a `delay` in seconds, arm it for
        callback(*args).  `at` is the session deadline it stands for (see schedule), None for
        any other use: a sleep, a TLS handshake, the backend's time to exit."""
        if self.timer is not None:
            self.timer.cancel()  # harmless on the one that just fired
        self.timer, self.timer_at = None, at
        if delay is not None:
            self.timer = asyncio.get_running_loop().call_later(max(0.0, delay), callback, *args)

    def due(self) -> None:
        """The deadline timer: time out the session if its deadline has come, else wait on."""
        self.set_timer(None)
        s = self.session
        if s is None or s.phase == "closed" or self.sleeping is not None:
            return
        deadline = None if self.pipe else s.deadline()
        if deadline is not None and now() >= deadline:
            self.act(s.timeout(now()))
        else:
            self.schedule()

    # --- client side -------------------------------------------------------------

    def to_client(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            data = self.tls.outgoing()
        t = self.client.transport if self.client else None
        if t is not None and not t.is_closing():
            t.write(data)

    def from_client(self, data: bytes) -> None:
        if self.tls_pending is not None:
            return self.handshake_data(data)
        if self.tls is not None:
            from libtarpit.tls import TLSFailed

            try:
                self.tls.feed(data)
                data = self.tls.read()
            except TLSFailed:
                return self.client_eof()
            out = self.tls.outgoing()
            if out:
                self.client.transport.write(out)
            if not data:
                return
        if self.sleeping is not None:
            sl = self.sleeping
            if not sl[1]:
                sl[2] = now() - sl[0]
            sl[1] += data
            if len(sl[1]) > 65536:
                self.client.transport.pause_reading()
            return
        if self.pipe:
            if self.backend is not None:
                self.backend.write(data)
            return
        self.act(self.session.client_data(data, now()))

    def client_eof(self) -> None:
        if self.session is None or self.session.phase == "closed":
            return
        if self.sleeping is not None:
            return self.wake(disconnected=True)
        self.act(self.session.client_data(b"", now()))

    def start_sleep(self, seconds: float) -> None:
        """A disconnect-aware sleep: keep reading to see the hang-up, hold what the client sends."""
        self.sleeping = [now(), b"", None]  # start, what the client sent meanwhile, when (a list: a dict is 0.2 KB)
        self.set_timer(seconds, self.wake)
        self.client.transport.resume_reading()
        self.backend_reading()  # paused: the session takes nothing while it sleeps

    def wake(self, disconnected: bool = False) -> None:
        from libtarpit.sleep import Outcome, SleepResult

        sl, self.sleeping = self.sleeping, None
        if sl is None:
            return
        self.set_timer(None)
        self.client.transport.pause_reading()
        self.backend_reading()
        result = SleepResult(Outcome.DISCONNECTED if disconnected else Outcome.ELAPSED,
                             round(now() - sl[0], 3), sl[1], sl[2])
        self.act(self.session.sleep_done(result, now()))

    def start_tls(self, reply: bytes) -> list:
        """Our 220, then the TLS layer between the client's transport and the session."""
        from libtarpit.errors import ControlError
        from libtarpit.tls import ServerTLS, load_context

        try:
            tls = ServerTLS(load_context(*self.tls_files))
        except ControlError as e:
            return self.session.tls_done(False, f"certificate: {e}", now())
        self.to_client(reply)
        self.tls_pending = tls  # from_client hands the client's bytes to handshake_data meanwhile
        self.set_timer(self.session.policy.idle_timeout or 60.0, self.handshake_timeout)
        return []

    def handshake_timeout(self) -> None:
        self.set_timer(None)
        if self.session is not None and self.session.phase == "tls":
            self.tls_pending = None
            self.act(self.session.tls_done(False, "handshake timeout", now()))

    def handshake_data(self, data: bytes) -> None:
        from libtarpit.tls import TLSFailed

        tls = self.tls_pending
        try:
            tls.feed(data)
            done = tls.handshake()
        except TLSFailed as e:
            self.client.transport.write(tls.outgoing())
            self.tls_pending = None
            return self.act(self.session.tls_done(False, e.reason, now()))
        out = tls.outgoing()
        if out:
            self.client.transport.write(out)
        if not done:
            return
        self.set_timer(None)
        self.tls, self.tls_pending = tls, None
        version, cipher = tls.info()
        self.act(self.session.tls_done(True, f"{version} {cipher}", now()))
        rest = tls.read()
        if rest:
            self.act(self.session.client_data(rest, now()))

    # --- backend -----------------------------------------------------------------

    def start_backend(self) -> list:
        """The backend on a socketpair, relayed by this loop."""
        ours, theirs = socket.socketpair()
        for sock, opt in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, opt, BACKEND_BUFFER)  # a ceiling: taken only when used
        try:
            self.backend_pid = self.listener.children.spawn(
                self.listener.program, self.listener.environ(self.env), theirs.fileno(), self)
        except OSError as e:
            ours.close()
            return self.session.fail("backend", f"{self.listener.program[0]}: {e.strerror or e}")
        finally:
            theirs.close()
        self.env = None
        self.backend = BackendSide(self, ours)
        return []

    def backend_filled(self, full: bool) -> None:
        """Back pressure: a backend slower than its client (a message body) stops the client's reads
        (schedule reads the backend side's FULL state to keep them stopped)."""
        if full:
            self.client.transport.pause_reading()
        else:
            self.schedule()

    def client_filled(self, full: bool) -> None:
        """Back pressure: a client slower than the backend (pass-through) stops the backend's reads."""
        self.client_full = full
        self.backend_reading()

    def backend_reading(self) -> None:
        """Read the backend unless a sleep holds the session or the client cannot take more."""
        t = self.backend
        if t is None or t.is_closing():
            return
        if self.sleeping is None and not self.client_full:
            t.resume_reading()
        else:
            t.pause_reading()

    def from_backend(self, data: bytes) -> None:
        if self.pipe:
            return self.client.transport.write(data)
        if self.session.phase != "closed":
            self.act(self.session.backend_data(data, now()))

    def backend_eof(self) -> None:
        if self.session is not None and self.session.phase != "closed":
            self.act(self.session.backend_data(b"", now()))

    def exec_backend(self) -> None:
        """The fast path: the backend gets the client's socket itself; we keep nothing but its pid."""
        t = self.client.transport
        sock = t.get_extra_info("socket")
        # O_NONBLOCK lives on the open file, which the child shares: a backend reading a
        # non-blocking socket takes EAGAIN for a hang-up (tcpserver hands over a blocking one)
        os.set_blocking(sock.fileno(), True)
        try:
            self.backend_pid = self.listener.children.spawn(
                self.listener.program, self.listener.environ(self.env), sock.fileno(), self)
        except OSError as e:
            self.act(self.session.fail("exec", f"{self.listener.program[0]}: {e.strerror or e}"))
            return
        t.abort()  # our copy of the fd only: the child holds the connection now
        self.session = None  # it counts against -c until its backend exits (exited), as under tcpserver

    def close(self, action) -> None:
        """Deliver the last replies, let the backend exit (at once, or within the action's
        linger, then TERM, then KILL), write the end line when it has.

        Done in the event that asked for it, not in a task: a client that leaves the tarpit
        is freed within the loop iteration that saw it go (and its backend told to stop)."""
        self.set_timer(None)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()  # flushes what is buffered first
        if self.backend is not None:
            self.backend.close()
        if not self.backend_pid or self.backend_status is not None:
            return self.ended(action, self.backend_status or 0)
        self.closing = action  # exited() ends it
        if action.linger > 0:
            self.set_timer(action.linger, self.kill, signal.SIGTERM)
        else:
            self.kill(signal.SIGTERM)

    def exited(self, status: int) -> None:
        """Our backend was reaped with `status` (Children)."""
        self.backend_status = status
        if self.session is None:  # exec'd: the client's connection ends with its backend
            self.finish()
        elif self.closing is not None:
            self.ended(self.closing, status)

    def kill(self, sig: int) -> None:
        """Send the backend `sig`; after TERM, KILL follows in a second if it is still there."""
        if self.backend_status is not None:
            return
        try:
            os.kill(self.backend_pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGTERM:
            self.set_timer(1.0, self.kill, signal.SIGKILL)

    def ended(self, action, status: int) -> None:
        """The backend has exited with `status` (or there was none): the end line, then finish."""
        self.set_timer(None)
        if status and action.linger > 0:
            self.log.event("error", what="backend", detail=f"exited with status {status}")
        self.log.event("end", **dict(action.fields))
        self.finish()

    def finish(self) -> None:
        """The connection is over: give back its per-IP count and its place under -c, once.

        A method, not a future with callbacks: two closures and a future were 0.8 KB of
        every held client."""
        if self.done == 2:
            return
        if self.done == 1:
            self.listener.release_ip(self.ip)
        self.done = 2
        self.listener.gone(self)


class Listener:
    """The listening socket, the concurrency limit, and what every connection shares."""

    def __init__(self, args, toml: tuple[str | None, str], control: str | None, config_path: str | None = None,
                 clients: Counter | None = None, backends: Counter | None = None, backend_limit: int = 0):
        self.args = args
        self.program = list(args.program)
        self.toml_text, self.toml_source = toml
        self.control = control
        self.config_path = config_path
        self.base_env = dict(os.environ)
        self.per_ip: dict[str, int] = {}
        self.clients = clients or Counter()          # every worker's clients (-c)
        self.backends = backends or Counter()        # every worker's backends running (--backends)
        self.backend_limit = backend_limit
        self.worker: int | None = None               # this worker's slot under --workers
        self._stores: dict[str, Any] = {}
        self._configs: dict[tuple, Any] = {}

    def difference(self, env: dict[str, str]) -> tuple:
        """What `env` sets (flat: name, value, name, value, ...) and unsets against our own
        environment: the whole dict (~1.5 KB) per client held in a greet pause or tarpit would
        be the largest thing it keeps.  environ() turns it back."""
        base = self.base_env
        return (tuple(x for k, v in env.items() if base.get(k) != v for x in (k, v)),
                tuple(k for k in base if k not in env))

    def environ(self, diff: tuple) -> dict[str, str]:
        """The backend's environment from a connection's difference() to ours."""
        env = dict(self.base_env)
        flat = diff[0]
        env.update(zip(flat[::2], flat[1::2]))
        for name in diff[1]:
            del env[name]
        return env

    def full(self) -> int:
        """The backend limit when that many backends run already (the session then says 421), else 0."""
        if self.backend_limit and self.backends.total() >= self.backend_limit:
            return self.backend_limit
        return 0

    def release_ip(self, ip: str) -> None:
        """One connection of `ip` has ended (the per-IP cap's count)."""
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]

    def say(self, text: str) -> None:
        if self.args.verbosity >= 1:
            sys.stderr.write(f"tarpit-smtpd serve: {text}\n")
            sys.stderr.flush()

    def config(self, env: dict[str, str]):
        """The Config for this client's environment (tarpit.toml as read at start or SIGHUP).

        Built once per distinct set of the variables the configuration reads (most clients share
        one: those of their tcprules entry); ConfigError for a bad value, as load_config.
        """
        from libtarpit import config as C

        key = tuple(env.get(v) for v in C.VARIABLES)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = C.load_config(env, self.toml_text, self.toml_source)
            if len(self._configs) >= 256:  # a rules file that sets per-client values: do not grow
                self._configs.clear()
            self._configs[key] = cfg
        return cfg

    def lists(self, cfg):
        from libtarpit.controldir import ControlDir

        return ControlDir(self.control or cfg.control, cfg.state_dir)

    def store(self, cfg):
        """One greylist store per URL for the whole process."""
        from libtarpit import greylist as gl

        if cfg.greylist_url not in self._stores:
            self._stores[cfg.greylist_url] = gl.open_store(cfg.greylist_url, timeout=cfg.greylist_timeout)
        return self._stores[cfg.greylist_url]

    async def reverse(self, ip: str) -> str | None:
        """The client's name as tcpserver -h (-p: forward-confirmed) would set it; None when none.

        Asked of the DNS, as tcpserver asks it (not /etc/hosts), within 2 s, in this loop: a
        thread per lookup would reserve a stack's address space each, which softlimit -m refuses.
        """
        from libtarpit.rdns import name_async

        name, _error = await name_async(ip, 2.0, confirm=self.args.paranoid)
        return name

    async def serve(self, srv: socket.socket) -> None:
        """Accept on the bound socket `srv` until SIGTERM, then drain."""
        a = self.args
        loop = asyncio.get_running_loop()
        self.children = Children(loop, self.backends)
        srv.setblocking(False)
        self.conns: set[Connection] = set()
        stopping = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: stopping.done() or stopping.set_result(None))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.snapshot)
        # 2,000 backends exiting at once overflow the signal wakeup socket: asyncio then writes a
        # warning per signal, although SIGCHLD's handler reaps them all (after the last
        # add_signal_handler, which sets the wakeup fd again with warnings on)
        signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)
        self.say(f"status: {self.clients.total()}/{a.concurrency}")
        accepting = loop.create_task(self.accept(srv))
        await stopping
        # SIGTERM: stop accepting, let the sessions held here finish, up to DRAIN seconds
        accepting.cancel()
        srv.close()
        self.say(f"stopping: {self.clients.mine()} sessions, at most {DRAIN:g} s")
        deadline = loop.time() + DRAIN
        while [c for c in self.conns if c.session is not None] and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def accept(self, srv: socket.socket) -> None:
        """Accept for ever; over -c, a client gets 421 and is closed (it retries later)."""
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(srv)
            if self.clients.total() >= self.args.concurrency:
                self.say(f"limit {self.clients.total()}/{self.args.concurrency}: 421 to {peer[0]}")
                try:
                    sock.send(TOO_BUSY)
                except OSError:
                    pass
                sock.close()
                continue
            self.clients.add(1)
            self.say(f"status: {self.clients.total()}/{self.args.concurrency}")
            loop.create_task(self.one(sock, peer))

    def reload(self) -> None:
        """SIGHUP: read tarpit.toml again (control lists and the rules CDB are read per connection)."""
        from libtarpit.config import ConfigError

        from tarpit_wrappers.settings import read_config

        try:
            _cfg, _control, path = read_config(self.base_env, self.control, self.config_path)
            self.toml_text = open(path, encoding="utf-8").read() if path else None
            self.toml_source = path or "tarpit.toml"
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            return self.say(f"reload failed, keeping the old configuration: {e}")
        self._configs.clear()
        self.say(f"reloaded {self.toml_source}")

    def snapshot(self) -> None:
        """SIGUSR1: one line: sessions per phase (sleeps by stage), per class, backends running."""
        phases: dict[str, int] = {}
        classes: dict[str, int] = {}
        backends = 0
        for c in self.conns:
            s = c.session
            if s is None:
                continue
            phase = f"sleeping:{s._sleep_stage}" if s.phase == "sleeping" else s.phase
            phases[phase] = phases.get(phase, 0) + 1
            classes[s.client.cls] = classes.get(s.client.cls, 0) + 1
            backends += bool(c.backend_pid)
        fields = " ".join(f"{k}={v}" for k, v in sorted(phases.items()))
        cls = " ".join(f"{k}={v}" for k, v in sorted(classes.items()))
        worker = "" if self.worker is None else f"worker={self.worker} "
        self.say(f"snapshot {worker}active={self.clients.mine()} backends={backends} "
                 f"exec={len(self.children.owners) - backends} phases: {fields or '-'} classes: {cls or '-'}")

    async def one(self, sock: socket.socket, peer: tuple) -> None:
        """Admit one client and start its session; the session then runs on callbacks alone, so
        no task or coroutine frame stays alive per held client."""
        conn = Connection(self, sock, peer, sock.getsockname())
        self.conns.add(conn)
        try:
            await conn.run()
        except Exception as e:  # our bug: one line, the client gets 451 if it is still there
            self.say(f"error {type(e).__name__}: {e}")
            try:
                sock.send(b"451 4.3.0 Temporary local problem, please try again later\r\n")
            except OSError:
                pass
            sock.close()
            conn.finish()

    def gone(self, conn: Connection) -> None:
        """A connection is over (its session closed, or its exec'd backend exited)."""
        self.conns.discard(conn)
        self.clients.add(-1)
        self.say(f"status: {self.clients.total()}/{self.args.concurrency}")


async def ident(local: tuple, peer: tuple, timeout: float) -> str | None:
    """TCPREMOTEINFO as tcpserver -r finds it (RFC 1413, ucspi-tcp's remoteinfo.c); None if the
    query failed or took longer than `timeout` seconds.

    From our address (port any) to the client's port 113: "CLIENTPORT , OURPORT"; of the
    reply line, what follows the third colon, blanks and CRs dropped, at most 257 bytes ("" when
    the line has fewer colons: tcpserver then sets TCPREMOTEINFO empty).
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)

    async def ask() -> str | None:
        s.bind((local[0], 0))
        await loop.sock_connect(s, (peer[0], 113))
        await loop.sock_sendall(s, f"{peer[1]} , {local[1]}\r\n".encode())
        out, colons = bytearray(), 0
        while True:
            chunk = await loop.sock_recv(s, 128)
            if not chunk:
                return None  # tcpserver: no end of line is a failed query
            for ch in chunk:
                if ch in b" \t\r":
                    continue
                if ch == 10:
                    return out.decode("latin-1")
                if colons < 3:
                    colons += ch == 58
                else:
                    out.append(ch)
                    if len(out) > 256:
                        return out.decode("latin-1")

    try:
        return await asyncio.wait_for(ask(), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        s.close()


def bind(args, n: int) -> list[socket.socket]:
    """Bind HOST:PORT `n` times and listen; return the sockets.

    With n > 1 the sockets share the port (SO_REUSEPORT) and a classic BPF program steers
    each connection by its source address, so one client address always reaches the same
    worker.  Raises OSError when the address cannot be bound or the kernel refuses the
    program (Linux >= 4.5 has it).
    """
    host = None if args.host == "0" else args.host
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    addr = (host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), args.port)
    socks = []
    for _ in range(n):
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if n > 1:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        srv.bind(addr)
        socks.append(srv)
    if n > 1:
        steer_by_source(socks[0], n, family)
    for srv in socks:
        srv.listen(args.backlog)
    return socks


def steer_by_source(srv: socket.socket, n: int, family: int) -> None:
    """Attach to `srv`'s SO_REUSEPORT group: socket = (last 32 bits of the source address) mod n.

    The per-IP cap is counted in each worker's memory: it is exact only if every connection
    from one address reaches one worker, which the kernel's default (a hash of the whole
    4-tuple, ports included) does not give.  OSError if the kernel refuses it.
    """
    import ctypes
    import struct

    net = -0x100000  # SKF_NET_OFF: offsets from the IP header
    src = 12 if family == socket.AF_INET else 20  # IPv4 source; the last word of the IPv6 source
    program = [(0x20, 0, 0, (net + src) & 0xFFFFFFFF),  # A = 32-bit word at the source address
               (0x94, 0, 0, n),                         # A %= n
               (0x16, 0, 0, 0)]                         # return A: the socket's index in the group
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    srv.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                   struct.pack("@HP", len(program), ctypes.addressof(code)))


def drop_privileges(args) -> None:
    """-g then -u, as tcpserver (after binding, before serving).  OSError if not permitted."""
    if args.gid is not None:
        os.setgroups([args.gid])
        os.setgid(args.gid)
    if args.uid is not None:
        os.setuid(args.uid)


def run_worker(listener: Listener, srv: socket.socket) -> int:
    """One worker's event loop until SIGTERM has drained it; return its exit status."""
    try:
        asyncio.run(listener.serve(srv))
    except KeyboardInterrupt:
        return 0
    return 0


def supervise(listener: Listener, socks: list[socket.socket]) -> int:
    """--workers: one child per socket; signals forwarded; a worker that dies is started again.

    The supervisor keeps every listening socket open, so a dead worker's clients wait in its
    queue for its successor instead of being refused.  Returns 0 once SIGTERM has stopped all.
    """
    workers: dict[int, int] = {}  # pid -> slot
    stopping = False

    def start(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            listener.clients.slot = listener.backends.slot = slot
            listener.worker = slot
            code = 1
            try:
                for i, other in enumerate(socks):
                    if i != slot:
                        other.close()
                code = run_worker(listener, socks[slot])
            finally:
                sys.stderr.flush()
                os._exit(code)
        workers[pid] = slot

    def forward(sig: int, _frame) -> None:
        nonlocal stopping
        stopping = stopping or sig == signal.SIGTERM
        for pid in list(workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)
    for slot in range(len(socks)):
        start(slot)
    listener.say(f"workers: {len(socks)} ({' '.join(str(p) for p in workers)})")
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot = workers.pop(pid, None)
        if slot is None:
            continue
        listener.clients.reset(slot)
        listener.backends.reset(slot)
        if not stopping:
            listener.say(f"worker {pid} ended with status {os.waitstatus_to_exitcode(status)}; starting another")
            time.sleep(1.0)  # a worker that dies at once must not spin
            if not stopping:
                start(slot)
    return 0


def daemonize(opts: dict, socks: list[socket.socket]):
    """--daemon: detach with python-daemon (umask 022, stderr to --log, --pidfile).

    The working directory stays: -x, the control directory and PROGRAM may be relative, as
    under tcpserver.

    Returns the open DaemonContext and a descriptor to write "ready" (or an error) to: the
    command we were started as waits for it and exits 0 (or prints the error and exits 111),
    so an init script that runs it finds the pid file written and the port served.  Raises
    OSError if the log cannot be opened or a live process holds the pid file (a stale one, left
    by a server that had dropped the rights to remove it, is removed).
    """
    import daemon
    import daemon.pidfile

    path = opts.get("pidfile") or PIDFILE
    try:  # a pid file left by a server that could not remove it after dropping privileges
        with open(path) as f:
            old = int(f.read().split()[0])
        os.kill(old, 0)
    except (OSError, ValueError, IndexError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        raise OSError(f"{path}: held by running process {old}")
    log = open(opts.get("log") or LOGFILE, "a", buffering=1)
    ready_r, ready = os.pipe()
    if os.fork() > 0:  # the command as started: wait for the daemon to say how it went
        os.close(ready)
        said = b""
        while chunk := os.read(ready_r, 4096):
            said += chunk
        if said == b"ready\n":
            os._exit(0)
        sys.stderr.write(said.decode(errors="replace") or "tarpit-smtpd serve: fatal: the daemon died at start\n")
        os._exit(111)
    os.close(ready_r)
    ctx = daemon.DaemonContext(umask=0o022, working_directory=os.getcwd(), files_preserve=[*socks, log, ready],
                               pidfile=daemon.pidfile.TimeoutPIDLockFile(path, acquire_timeout=0),
                               stdout=log, stderr=log, signal_map={}, detach_process=True)
    try:
        ctx.open()
    except Exception as e:  # lockfile's errors are not OSErrors
        raise OSError(f"{path}: {e}") from None
    sys.stderr = sys.stdout = log
    return ctx, ready


def main(argv: list[str]) -> int:
    """Entry for `tarpit-smtpd serve ...`; returns 100 for usage errors, 111 for trouble at start."""
    from libtarpit.procenv import undo_locale_coercion
    from libtarpit.serveargs import USAGE, UsageError, parse

    undo_locale_coercion()  # the backend gets tcpserver's environment, not the one Python made
    try:
        args = parse(argv, os.environ, long_options=LONG_OPTIONS)
        opts = dict(args.options)
        workers, backend_limit = (_count(opts, name, low) for name, low in (("workers", 1), ("backends", 0)))
    except UsageError as e:
        sys.stderr.write(f"tarpit-smtpd serve: {e}\n{USAGE}\n")
        return 100
    from libtarpit.config import ConfigError

    from tarpit_wrappers.settings import read_config

    try:
        cfg, control, path = read_config(os.environ, opts.get("control"), opts.get("config"))
        text = open(path, encoding="utf-8").read() if path else None
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        sys.stderr.write(f"tarpit-smtpd serve: fatal: {e}\n")
        return 111
    listener = Listener(args, (text, path or "tarpit.toml"), opts.get("control"), opts.get("config"),
                        Counter(workers), Counter(workers), backend_limit)
    ctx, ready = None, None
    try:
        socks = bind(args, workers)
        if "daemon" in opts:
            ctx, ready = daemonize(opts, socks)
        drop_privileges(args)
    except OSError as e:
        sys.stderr.write(f"tarpit-smtpd serve: fatal: {e}\n")
        if ready is not None:
            os.write(ready, f"tarpit-smtpd serve: fatal: {e}\n".encode())
        return 111
    if ready is not None:
        os.write(ready, b"ready\n")
        os.close(ready)
    try:
        return supervise(listener, socks) if workers > 1 else run_worker(listener, socks[0])
    finally:
        if ctx is not None:
            try:
                ctx.close()  # removes the pid file, if the user we became still may
            except OSError:
                pass


def _count(opts: dict, name: str, low: int) -> int:
    """--NAME=N as an int of at least `low` (absent: `low`); UsageError otherwise."""
    from libtarpit.serveargs import UsageError

    text = opts.get(name)
    if text is None:
        return low
    if not text.isdigit() or int(text) < low or int(text) > 10000:
        raise UsageError(f"--{name} wants a number from {low} to 10000, not {text!r}")
    return int(text)
