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
per phase and class, backends running).  Over -c a client gets 421.

Not done yet (docs/serve.md): ident lookups (-r is accepted and logged at
start as not done), --daemon, --workers.
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


def now() -> float:
    """The listener's one clock (wall time: greylist records are shared with the wrapper)."""
    return time.time()


class Children:
    """Every child we start, reaped on SIGCHLD; `wait(pid)` is a future of its exit status."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.futures: dict[int, asyncio.Future] = {}
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def spawn(self, program: list[str], env: dict[str, str], fd: int) -> tuple[int, asyncio.Future]:
        """Start `program` with `fd` as its stdin and stdout; return its pid and the future of its
        exit status (OSError if it cannot start)."""
        pid = os.posix_spawnp(program[0], program, env,
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM))
        fut = self.futures[pid] = self.loop.create_future()
        return pid, fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fut = self.futures.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(os.waitstatus_to_exitcode(status))

    @staticmethod
    async def stop(pid: int, exited: asyncio.Future, linger: float) -> int:
        """Let child `pid` exit on its own for `linger` s, then TERM, then KILL; return its status."""
        for sig, wait in ((None, linger), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            if sig is not None and not exited.done():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if exited.done():
                return exited.result()
            if wait > 0:
                try:
                    return await asyncio.wait_for(asyncio.shield(exited), wait)
                except asyncio.TimeoutError:
                    pass
        return -signal.SIGKILL


class Side(asyncio.Protocol):
    """One socket of a connection (client or backend): bytes in go to `on_data`, EOF to `on_eof`."""

    __slots__ = ("on_data", "on_eof", "transport")

    def __init__(self, on_data, on_eof):
        self.on_data, self.on_eof = on_data, on_eof
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool:
        self.on_eof()
        return True  # keep our write side open: replies owed after a half-close still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_eof()


class Connection:
    """One client: admission, then exec or a session driven by this loop's events."""

    __slots__ = ("listener", "sock", "peer", "local", "client", "backend", "backend_pid", "backend_exit",
                 "session", "log", "sleeping", "timer", "tls", "tls_pending", "tls_files", "pipe", "closed",
                 "ip", "env", "__weakref__")

    def __init__(self, listener: Listener, sock: socket.socket, peer: tuple, local: tuple):
        self.listener = listener
        self.sock = sock
        self.peer, self.local = peer, local
        self.client: Side | None = None
        self.backend: Side | None = None
        self.backend_pid = 0
        self.session: Any = None
        self.log: Any = None
        self.sleeping: dict | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tls: Any = None
        self.tls_files: Any = None
        self.pipe = False
        self.closed = asyncio.get_running_loop().create_future()
        self.ip = ""

    # --- start ------------------------------------------------------------

    async def run(self) -> None:
        """Admit, then exec or relay until the session closes."""
        from libtarpit import admission
        from libtarpit.log import EventLog

        L = self.listener
        env = await self.environment()
        if env is None:
            self.sock.close()
            return self.closed.set_result(None)
        pid = os.getpid()
        self.log = EventLog(sys.stderr, {
            "conn": f"{int(time.time() * 1000) % 10**10:x}.{pid}.{id(self) % 10**6}", "pid": pid,
            "ip": env.get("TCPREMOTEIP", "-"), "host": env.get("TCPREMOTEHOST") or "-",
            "class": "-", "rule": "-"})
        try:
            cfg = L.config(env)
        except Exception as e:  # a bad value set by a tcprules variable: 451, as the wrapper
            return self.refused(admission.refuse("config", str(e)))
        adm = admission.admit(env, cfg, L.lists(cfg), now(), None)
        if adm.route == "refuse":
            return self.refused(adm)
        c = adm.client
        self.log.update(**{"class": c.cls, "rule": "-" if c.rule is None else c.rule})
        if adm.limit > 0 and L.per_ip.get(self.ip, 0) >= adm.limit:
            return self.refused(admission.over_limit(adm))  # the per-IP cap: a count, no lock file
        for line in adm.logs:
            self.log.event(line.event, **dict(line.fields))
        L.per_ip[self.ip] = L.per_ip.get(self.ip, 0) + 1
        self.closed.add_done_callback(lambda _f: L.release_ip(self.ip))
        await self.relay(adm, cfg, env)
        # returns with the session running: the caller waits for `closed`, so no frame keeps
        # the environment, the Config or the Admission alive for as long as a client is held

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
        host = None
        if a.remote_host:
            host = await L.reverse(ip)
            if host:
                env["TCPREMOTEHOST"] = host
        if a.rules:
            from libtarpit import tcprules
            from libtarpit.errors import ControlError

            try:
                rule = tcprules.lookup(a.rules, ip, host)
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
        for line in adm.logs:
            self.log.event(line.event, **dict(line.fields))
        try:
            self.sock.setblocking(False)
            self.sock.send(adm.reply)
        except OSError:
            pass
        self.sock.close()
        self.log.event("end", reason=adm.reason)
        self.closed.set_result(None)

    # --- the session ---------------------------------------------------------

    async def relay(self, adm, cfg, env: dict[str, str]) -> None:
        from libtarpit.session import Session

        greylist = None
        if adm.greylist is not None:
            from libtarpit import greylist as gl

            greylist = gl.Greylist(self.listener.store(cfg), adm.greylist)
        if cfg.tls_cert and adm.route == "proxy":
            self.tls_files = (cfg.tls_cert, cfg.tls_key or None)
        self.env = env
        self.session = Session(adm.client, adm.policy, adm.lists, greylist, now(),
                               proxy=adm.route == "proxy", tls=self.tls_files is not None)
        loop = asyncio.get_running_loop()
        _, self.client = await loop.connect_accepted_socket(
            lambda: Side(self.from_client, self.client_eof), self.sock)
        self.client.transport.pause_reading()  # nothing is read before the session asks for it
        self.act(self.session.start())

    def act(self, actions: list) -> None:
        """Carry out the session's actions in order."""
        from libtarpit import actions as A

        todo = list(actions)
        while todo:
            a = todo.pop(0)
            if isinstance(a, A.Log):
                self.log.event(a.event, **dict(a.fields))
            elif isinstance(a, A.SendClient):
                self.to_client(a.data)
            elif isinstance(a, A.SendBackend):
                if self.backend is not None and self.backend.transport is not None:
                    self.backend.transport.write(a.data)
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
                asyncio.ensure_future(self.close(a))
                return
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
        if self.pipe or s.wants_client():
            self.client.transport.resume_reading()
        else:
            self.client.transport.pause_reading()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        deadline = s.deadline()
        if deadline is not None and not self.pipe:
            self.timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - now()), lambda: self.act(self.session.timeout(now())))

    # --- client side -------------------------------------------------------------

    def to_client(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            data = self.tls.outgoing()
        t = self.client.transport if self.client else None
        if t is not None and not t.is_closing():
            t.write(data)

    def from_client(self, data: bytes) -> None:
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
            if not sl["early"]:
                sl["early_at"] = now() - sl["start"]
            sl["early"] += data
            if len(sl["early"]) > 65536:
                self.client.transport.pause_reading()
            return
        if self.pipe:
            if self.backend is not None and self.backend.transport is not None:
                self.backend.transport.write(data)
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
        self.sleeping = {"start": now(), "early": b"", "early_at": None}
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self.wake)
        self.client.transport.resume_reading()
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()  # the session takes nothing while it sleeps

    def wake(self, disconnected: bool = False) -> None:
        from libtarpit.sleep import Outcome, SleepResult

        sl, self.sleeping = self.sleeping, None
        if sl is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.client.transport.pause_reading()
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()
        result = SleepResult(Outcome.DISCONNECTED if disconnected else Outcome.ELAPSED,
                             round(now() - sl["start"], 3), sl["early"], sl["early_at"])
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
        self.tls_pending = tls
        self.client.on_data = self.handshake_data
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(
            self.session.policy.idle_timeout or 60.0, self.handshake_timeout)
        return []

    def handshake_timeout(self) -> None:
        self.timer = None
        if self.session is not None and self.session.phase == "tls":
            self.client.on_data = self.from_client
            self.act(self.session.tls_done(False, "handshake timeout", now()))

    def handshake_data(self, data: bytes) -> None:
        from libtarpit.tls import TLSFailed

        tls = self.tls_pending
        try:
            tls.feed(data)
            done = tls.handshake()
        except TLSFailed as e:
            self.client.transport.write(tls.outgoing())
            self.client.on_data = self.from_client
            return self.act(self.session.tls_done(False, e.reason, now()))
        out = tls.outgoing()
        if out:
            self.client.transport.write(out)
        if not done:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tls, self.client.on_data = tls, self.from_client
        version, cipher = tls.info()
        self.act(self.session.tls_done(True, f"{version} {cipher}", now()))
        rest = tls.read()
        if rest:
            self.act(self.session.client_data(rest, now()))

    # --- backend -----------------------------------------------------------------

    def start_backend(self) -> list:
        """The backend on a socketpair, relayed by this loop."""
        ours, theirs = socket.socketpair()
        try:
            self.backend_pid, self.backend_exit = self.listener.children.spawn(
                self.listener.program, self.env, theirs.fileno())
        except OSError as e:
            ours.close()
            return self.session.fail("backend", f"{self.listener.program[0]}: {e.strerror or e}")
        finally:
            theirs.close()
        self.env = None  # a copy of the whole environment: not worth keeping per held client
        loop = asyncio.get_running_loop()
        self.backend = Side(self.from_backend, self.backend_eof)
        loop.create_task(loop.connect_accepted_socket(lambda: self.backend, ours))
        return []

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
            _pid, exited = self.listener.children.spawn(self.listener.program, self.env, sock.fileno())
        except OSError as e:
            self.act(self.session.fail("exec", f"{self.listener.program[0]}: {e.strerror or e}"))
            return
        t.abort()  # our copy of the fd only: the child holds the connection now
        self.session = None
        # the connection counts against -c until its backend exits, as tcpserver counts children
        exited.add_done_callback(
            lambda _f: self.closed.done() or self.closed.set_result(None))

    async def close(self, action) -> None:
        """Deliver the last replies, let the backend exit, write the end line."""
        if self.timer is not None:
            self.timer.cancel()
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()  # flushes what is buffered first
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()
        if self.backend_pid:
            status = await Children.stop(self.backend_pid, self.backend_exit, action.linger)
            if status and action.linger > 0:
                self.log.event("error", what="backend", detail=f"exited with status {status}")
        self.log.event("end", **dict(action.fields))
        if not self.closed.done():
            self.closed.set_result(None)


class Listener:
    """The listening socket, the concurrency limit, and what every connection shares."""

    def __init__(self, args, toml: tuple[str | None, str], control: str | None, config_path: str | None = None):
        self.args = args
        self.program = list(args.program)
        self.toml_text, self.toml_source = toml
        self.control = control
        self.config_path = config_path
        self.base_env = dict(os.environ)
        self.per_ip: dict[str, int] = {}
        self.active = 0
        self._stores: dict[str, Any] = {}
        self._resolver = None

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
        """The Config for this client's environment (tarpit.toml read once at start)."""
        from libtarpit.config import load_config

        return load_config(env, self.toml_text, self.toml_source)

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
        """The client's name as tcpserver -h (-p: forward-confirmed) would set it; None when none."""
        loop = asyncio.get_running_loop()
        if self.args.paranoid:
            from libtarpit.rdns import confirmed_name

            name, _err = await loop.run_in_executor(None, confirmed_name, ip, 2.0)
            return name
        try:
            name = (await asyncio.wait_for(loop.getnameinfo((ip, 0), socket.NI_NAMEREQD), 2.0))[0]
        except (OSError, asyncio.TimeoutError):
            return None
        return name.lower().rstrip(".")

    async def serve(self) -> None:
        a = self.args
        loop = asyncio.get_running_loop()
        self.children = Children(loop)
        host = None if a.host == "0" else a.host
        family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), a.port))
        srv.listen(a.backlog)
        srv.setblocking(False)
        if a.gid is not None:
            os.setgid(a.gid)
        if a.uid is not None:
            os.setuid(a.uid)
        if a.remote_info:
            self.say("note: -r (ident lookups) is not done; TCPREMOTEINFO stays unset")
        self.conns: set[Connection] = set()
        stopping = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: stopping.done() or stopping.set_result(None))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.snapshot)
        self.say(f"status: 0/{a.concurrency}")
        accepting = loop.create_task(self.accept(srv))
        await stopping
        # SIGTERM: stop accepting, let the sessions held here finish, up to DRAIN seconds
        accepting.cancel()
        srv.close()
        self.say(f"stopping: {self.active} sessions, at most {DRAIN:g} s")
        deadline = loop.time() + DRAIN
        while [c for c in self.conns if c.session is not None] and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def accept(self, srv: socket.socket) -> None:
        """Accept for ever; over -c, a client gets 421 and is closed (it retries later)."""
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(srv)
            if self.active >= self.args.concurrency:
                self.say(f"limit {self.active}/{self.args.concurrency}: 421 to {peer[0]}")
                try:
                    sock.send(TOO_BUSY)
                except OSError:
                    pass
                sock.close()
                continue
            self.active += 1
            self.say(f"status: {self.active}/{self.args.concurrency}")
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
        self.say(f"snapshot active={self.active} backends={backends} exec={len(self.children.futures) - backends} "
                 f"phases: {fields or '-'} classes: {cls or '-'}")

    async def one(self, sock: socket.socket, peer: tuple) -> None:
        conn = Connection(self, sock, peer, sock.getsockname())
        self.conns.add(conn)
        try:
            await conn.run()
            await conn.closed
        except Exception as e:  # our bug: one line, the client gets 451 if it is still there
            self.say(f"error {type(e).__name__}: {e}")
            try:
                sock.send(b"451 4.3.0 Temporary local problem, please try again later\r\n")
            except OSError:
                pass
            sock.close()
        finally:
            self.conns.discard(conn)
            self.active -= 1
            self.say(f"status: {self.active}/{self.args.concurrency}")


def main(argv: list[str]) -> int:
    """Entry for `tarpit-smtpd serve ...`; returns 100 for usage errors, 111 for trouble at start."""
    from libtarpit.serveargs import USAGE, UsageError, parse

    try:
        args = parse(argv, os.environ, long_options=("control=", "config="))
    except UsageError as e:
        sys.stderr.write(f"tarpit-smtpd serve: {e}\n{USAGE}\n")
        return 100
    opts = dict(args.options)
    from libtarpit.config import ConfigError

    from tarpit_wrappers.settings import read_config

    try:
        cfg, control, path = read_config(os.environ, opts.get("control"), opts.get("config"))
        text = open(path, encoding="utf-8").read() if path else None
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        sys.stderr.write(f"tarpit-smtpd serve: fatal: {e}\n")
        return 111
    listener = Listener(args, (text, path or "tarpit.toml"), opts.get("control"), opts.get("config"))
    try:
        asyncio.run(listener.serve())
    except OSError as e:
        sys.stderr.write(f"tarpit-smtpd serve: fatal: {e}\n")
        return 111
    except KeyboardInterrupt:
        return 0
    return 0
