"""Greylist stores: the records behind libtarpit.greylist, in SQLite or Redis.

Public names:
  TRIPLE, TARPIT, WHITE   the three tables (a triple; a client that dropped during the tarpit;
                          a whitelisted client)
  Record        one stored record (frozen)
  View          what `check` reads in one round trip: the client's whitelist, tarpit and triple records
  Hit           how one atomic update changes a record (frozen)
  apply_hit     the update rule every store applies atomically (pure; the Lua script mirrors it)
  SQLiteStore   one SQLite file in WAL mode; BEGIN IMMEDIATE around each read-modify-write
  RedisStore    one Redis server shared by several MX hosts; Lua for updates; every key has a TTL
  parse_redis_url  the parts of a redis:// or unix:// URL (host or socket, port, db, user, password)

Every store method that talks to the store raises libtarpit.errors.StoreError on failure
(locked past the timeout, unreachable, too slow, corrupt); nothing else escapes.
A record is live while `until > now`; the clock is always the caller's `now`, so tests
can drive it.  Redis TTLs (and `purge` for SQLite) only collect the dead ones.
The only other clock read here is time.monotonic() for how long we wait: the SQLite
busy-retry loop and the Redis client's per-call deadline.  It bounds the wait and decides
nothing about a record.
"""

from __future__ import annotations

import time

from libtarpit.values import value

TYPE_CHECKING = False  # typing and dataclasses would add ~4 MB to every tarpitted connection
if TYPE_CHECKING:
    import sqlite3
    from typing import Any, Iterator

from libtarpit.errors import StoreError

TRIPLE = "triple"
TARPIT = "tarpit"
WHITE = "white"
TABLES = (TRIPLE, TARPIT, WHITE)


class Record(value("Record", "table client sender rcpt first last count until passed", (False,))):
    """One greylist record.  `sender`/`rcpt` are "" for tarpit and white records."""

    __slots__ = ()

    @property
    def kind(self) -> str:
        """Return "grey", "pass", "tarpit" or "white" (the `tarpitctl greylist list` column)."""
        if self.table == TRIPLE:
            return "pass" if self.passed else "grey"
        return self.table

    def live(self, now: float) -> bool:
        """Return True while the record has not expired at `now`."""
        return self.until > now


class View(value("View", "white tarpit triple")):
    """The live records `Greylist.check` needs, read together (each a Record or None)."""

    __slots__ = ()


class Hit(value("Hit", "ttl add count_before pass_at set_passed", (0, None, None, False))):
    """One atomic update of a record (created when absent or expired).

    ttl            the record lives at least until now + ttl (never shortened)
    add            added to count unconditionally
    count_before   when set, count += 1 if the record's first seen <= this time
    pass_at        when set, the record is marked passed once count >= this
    set_passed     mark the record passed
    """

    __slots__ = ()


def apply_hit(old: Record | None, key: tuple[str, str, str, str], now: float, hit: Hit) -> Record:
    """Return the record after `hit` at `now`; `old` None or expired means a new record."""
    if old is None or not old.live(now):
        old = Record(*key, first=now, last=now, count=0, until=now)
    count = old.count + hit.add
    if hit.count_before is not None and old.first <= hit.count_before:
        count += 1
    passed = old.passed or hit.set_passed or (hit.pass_at is not None and count >= hit.pass_at)
    return old._replace(last=now, count=count, until=max(old.until, now + hit.ttl), passed=passed)


# ---------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS greylist (
  tbl TEXT NOT NULL, client TEXT NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
  first REAL NOT NULL, last REAL NOT NULL, count INTEGER NOT NULL,
  until REAL NOT NULL, passed INTEGER NOT NULL,
  PRIMARY KEY (tbl, client, sender, rcpt)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS greylist_until ON greylist (until);
"""
_COLUMNS = "tbl, client, sender, rcpt, first, last, count, until, passed"


def _busy(e: sqlite3.Error) -> bool:
    import _sqlite3 as sqlite3

    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def _row(row: tuple[Any, ...]) -> Record:
    tbl, client, sender, rcpt, first, last, count, until, passed = row
    return Record(tbl, client, sender, rcpt, first, last, int(count), until, bool(passed))


class SQLiteStore:
    """Greylist records in one SQLite file (WAL), shared by many wrapper processes.

    Opening is free; the file is opened on first use.  Waits for a lock about
    `timeout` seconds (busy_timeout, at most twice that in all), then raises StoreError.
    """

    def __init__(self, path: str, *, timeout: float):
        self.path = path
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            import _sqlite3 as sqlite3  # here, so a Redis store does not load it; _sqlite3: sqlite3 adds datetime (1.8 ms)

            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'greylist'").fetchone():
                    # IMMEDIATE takes the write lock through the busy handler; a bare
                    # CREATE would upgrade a read lock and may fail at once instead.
                    db.execute("BEGIN IMMEDIATE")
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(statement)
                    db.execute("COMMIT")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _run(self, fn, *args):
        """Run fn(conn, *args); turn every sqlite3 failure into StoreError.

        SQLite answers "locked" at once, without waiting, in a few cases (a read lock that
        cannot be upgraded, a file switching to WAL); those are retried until `timeout`.
        The retry loop's deadline is monotonic time, not the caller's `now`: it measures how
        long we wait, it decides nothing about the records.
        """
        import _sqlite3 as sqlite3

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return fn(self._conn(), *args)
            except sqlite3.Error as e:
                self._rollback()
                if _busy(e) and time.monotonic() < deadline:
                    import random

                    time.sleep(random.uniform(0.005, 0.03))
                    continue
                raise StoreError(f"sqlite {self.path}: {e}") from e

    def _rollback(self) -> None:
        import _sqlite3 as sqlite3

        if self._db is not None and self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                self.close()

    def view(self, client: str, sender: str, rcpt: str, now: float) -> View:
        """Return the live white, tarpit and triple records of client/triple.  Raises StoreError."""

        def read(db: sqlite3.Connection) -> View:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM greylist WHERE until > ? AND client = ? AND "
                "((tbl IN (?, ?) AND sender = '' AND rcpt = '') OR "
                "(tbl = ? AND sender = ? AND rcpt = ?))",
                (now, client, WHITE, TARPIT, TRIPLE, sender, rcpt),
            ).fetchall()
            by = {r.table: r for r in map(_row, rows)}
            return View(by.get(WHITE), by.get(TARPIT), by.get(TRIPLE))

        return self._run(read)

    def hit(self, table: str, client: str, sender: str, rcpt: str, now: float, hit: Hit) -> tuple[Record, bool]:
        """Apply `hit` atomically; return (new record, True if it was created).  Raises StoreError."""

        def update(db: sqlite3.Connection) -> tuple[Record, bool]:
            key = (table, client, sender, rcpt)
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                f"SELECT {_COLUMNS} FROM greylist WHERE tbl = ? AND client = ? AND sender = ? AND rcpt = ?", key
            ).fetchone()
            old = _row(row) if row else None
            new = apply_hit(old, key, now, hit)
            db.execute(
                f"INSERT OR REPLACE INTO greylist ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, new.first, new.last, new.count, new.until, int(new.passed)),
            )
            db.execute("COMMIT")
            return new, old is None or not old.live(now)

        return self._run(update)

    def remove(self, table: str, client: str, sender: str = "", rcpt: str = "") -> int:
        """Delete one record; return how many were deleted (0 or 1).  Raises StoreError."""
        sql = "DELETE FROM greylist WHERE tbl = ? AND client = ? AND sender = ? AND rcpt = ?"
        return self._run(lambda db: db.execute(sql, (table, client, sender, rcpt)).rowcount)

    def delete(self, client: str, sender: str | None = None, rcpt: str | None = None) -> int:
        """Delete all records of `client`, or only its triple when sender and rcpt are given.

        Returns how many records were deleted.  Raises StoreError.
        """
        if sender is not None and rcpt is not None:
            return self.remove(TRIPLE, client, sender, rcpt)
        return self._run(lambda db: db.execute("DELETE FROM greylist WHERE client = ?", (client,)).rowcount)

    def records(self, now: float | None = None) -> list[Record]:
        """Return all records (live ones only when `now` is given), by table and client.  Raises StoreError."""
        where, args = ("WHERE until > ?", (now,)) if now is not None else ("", ())
        sql = f"SELECT {_COLUMNS} FROM greylist {where} ORDER BY tbl, client, sender, rcpt"
        return self._run(lambda db: [_row(r) for r in db.execute(sql, args)])

    def purge(self, now: float) -> int:
        """Delete the records expired at `now`; return how many.  Raises StoreError."""
        return self._run(lambda db: db.execute("DELETE FROM greylist WHERE until <= ?", (now,)).rowcount)

    def close(self) -> None:
        """Close the file (a later call reopens it)."""
        if self._db is not None:
            self._db.close()
            self._db = None


# ---------------------------------------------------------------- Redis
#
# redis:// and unix:// speak RESP2 over our own socket (_Resp), not through redis-py:
# `import redis` pulls in asyncio and costs 160-230 ms of every connection's start-up
# (every redis.* submodule goes through redis/__init__, so no part of it is cheaper),
# against ~1 ms for _socket.  The store needs six commands (AUTH, SELECT, EVALSHA, EVAL,
# HGETALL, SCAN, DEL), pipelined where it reads several records.  rediss:// keeps going
# through redis-py (_RedisPy), so TLS and its URL options (ssl_cert_reqs, ssl_ca_certs,
# ...) mean exactly what redis-py says; it pays the import.

# Mirrors apply_hit.  Numbers go in and out as strings so no float is rounded by Lua.
_LUA_HIT = """
local now = tonumber(ARGV[1])
local r = redis.call('HMGET', KEYS[1], 'first', 'count', 'until', 'passed')
local first, count, untl, passed, created = now, 0, now, 0, 1
if r[1] and r[3] and tonumber(r[3]) > now then
  first, count, untl, passed, created = tonumber(r[1]), tonumber(r[2]), tonumber(r[3]), tonumber(r[4]), 0
end
count = count + tonumber(ARGV[3])
if ARGV[4] ~= '' and first <= tonumber(ARGV[4]) then count = count + 1 end
if ARGV[6] == '1' or (ARGV[5] ~= '' and count >= tonumber(ARGV[5])) then passed = 1 end
local nu = now + tonumber(ARGV[2])
if untl > nu then nu = untl end
local firsts = ARGV[1]
if created == 0 then firsts = r[1] end
redis.call('HSET', KEYS[1], 'tbl', ARGV[7], 'client', ARGV[8], 'sender', ARGV[9], 'rcpt', ARGV[10],
  'first', firsts, 'last', ARGV[1], 'count', count, 'until', string.format('%.6f', nu), 'passed', passed)
redis.call('EXPIRE', KEYS[1], math.max(1, math.ceil(nu - now)))
return {created, redis.call('HGETALL', KEYS[1])}
"""

_REDIS_PY_SCHEMES = ("rediss://",)
_URL_OPTIONS = ("db", "username", "password")
_BATCH = 500


def _sha1_hex(data: bytes) -> str:
    try:
        from _sha1 import sha1  # the builtin module: hashlib would load OpenSSL (~3 ms)
    except ImportError:
        from hashlib import sha1
    return sha1(data).hexdigest()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    from urllib.parse import unquote

    return unquote(text)


def _safe_url(url: str) -> str:
    """The URL without user and password, for messages."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.split("?", 1)[0].partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"


def parse_redis_url(url: str) -> tuple[str | None, str | None, int, int, str | None, str | None]:
    """Return (unix path, host, port, db, username, password) of a redis:// or unix:// URL.

    redis://[[user]:password@]host[:port][/db][?db=N&password=...&username=...] and
    unix://[[user]:password@]/path[?db=N&password=...]; user and password are %-decoded,
    a `db` option wins over the path, as in redis-py.  Raises ValueError for another scheme,
    a bad port or db, or another option (a silently ignored option could be a TLS setting).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "unix"):
        raise ValueError("not a redis:// or unix:// URL")
    rest, _, query = rest.partition("?")
    opts = {}
    for part in filter(None, query.split("&")):
        name, _, val = part.partition("=")
        if name not in _URL_OPTIONS:
            raise ValueError(f"unsupported URL option {name!r}")
        opts[name] = _unquote(val)
    netloc, _, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username, password = _unquote(user) or None, _unquote(pw) if colon else None
    username = opts.get("username", username)
    password = opts.get("password", password)
    if username is not None and password is None:
        raise ValueError("a Redis user needs a password")
    if scheme == "unix":
        if hostport or not path:
            raise ValueError("a unix:// URL names a path: unix:///run/redis/redis.sock")
        return _unquote("/" + path), None, 0, int(opts.get("db", 0)), username, password
    if hostport.startswith("["):
        host, close, tail = hostport[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ValueError("bad IPv6 host")
        port_text = tail[1:]
    else:
        host, _, port_text = hostport.partition(":")
    port = int(port_text) if port_text else 6379
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    db = int(opts.get("db", path.strip("/") or 0))
    if db < 0:
        raise ValueError(f"bad db {db}")
    return None, _unquote(host) or "localhost", port, db, username, password


class _ErrorReply:
    """An error reply of the server ("ERR ...", "NOSCRIPT ..."), returned in place of a reply."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _pack(commands: list[tuple[Any, ...]]) -> bytes:
    out = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "surrogateescape")
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Resp:
    """RESP2 over one TCP or unix socket, for the few commands RedisStore sends.

    execute(commands) sends them in one write and returns one reply each (str, int, None,
    list, or _ErrorReply).  The whole call, connecting included, ends within `timeout`
    seconds (a monotonic deadline: it measures waiting, it decides nothing); any socket
    or protocol trouble closes the connection (the next call reconnects) and raises
    StoreError.  A bad URL raises ValueError.
    """

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self._sock: Any = None
        self._buf = bytearray()
        self._pos = 0

    def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        deadline = time.monotonic() + self.timeout
        try:
            if self._sock is None:
                self._connect(deadline)
            return self._roundtrip(commands, deadline)
        except OSError as e:
            self.close()
            raise StoreError(f"redis {_safe_url(self.url)}: {e.strerror or e}") from e
        except BaseException:
            self.close()
            raise

    def _connect(self, deadline: float) -> None:
        import _socket

        path, host, port, db, username, password = parse_redis_url(self.url)
        if path is not None:
            targets = [(_socket.AF_UNIX, path)]
        else:
            targets = [(a[0], a[4]) for a in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)]
        error: OSError = ConnectionError("no address")
        for family, address in targets:
            sock = _socket.socket(family, _socket.SOCK_STREAM)
            try:
                sock.settimeout(_left(deadline))
                sock.connect(address)
            except OSError as e:
                sock.close()
                error = e
                continue
            if family != _socket.AF_UNIX:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            self._sock, self._buf, self._pos = sock, bytearray(), 0
            break
        else:
            raise error
        hello = []
        if password is not None:
            hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            hello.append(("SELECT", db))
        # answered before any command is sent: after a failed SELECT a pipelined write
        # would land in database 0
        for cmd, reply in zip(hello, self._roundtrip(hello, deadline) if hello else ()):
            if isinstance(reply, _ErrorReply):
                raise ConnectionError(f"{cmd[0]}: {reply.text}")

    def _roundtrip(self, commands: list[tuple[Any, ...]], deadline: float) -> list[Any]:
        self._sock.settimeout(_left(deadline))
        self._sock.sendall(_pack(commands))
        return [self._reply(deadline) for _ in commands]

    def _reply(self, deadline: float) -> Any:
        line = self._line(deadline)
        kind, rest = line[:1], line[1:]
        try:
            if kind == b"+":
                return rest.decode("utf-8", "surrogateescape")
            if kind == b"-":
                return _ErrorReply(rest.decode("utf-8", "replace"))
            if kind == b":":
                return int(rest)
            if kind == b"$":
                n = int(rest)
                return None if n < 0 else self._exact(n, deadline).decode("utf-8", "surrogateescape")
            if kind == b"*":
                n = int(rest)
                return None if n < 0 else [self._reply(deadline) for _ in range(n)]
        except ValueError:
            pass
        raise ConnectionError(f"protocol error: unexpected reply {line[:40]!r}")

    def _line(self, deadline: float) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = bytes(self._buf[self._pos:end])
                self._pos = end + 2
                return line
            self._fill(deadline)

    def _exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) - self._pos < n + 2:
            self._fill(deadline)
        data = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n + 2
        return data

    def _fill(self, deadline: float) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._sock.settimeout(_left(deadline))
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self._buf += chunk

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class _RedisPy:
    """_Resp's execute() over redis-py, for rediss://: TLS and its URL options are redis-py's."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self._conn: Any = None

    def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        import redis

        try:
            if self._conn is None:
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                pool = redis.ConnectionPool.from_url(
                    self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                    retry=Retry(NoBackoff(), 0), decode_responses=True,
                    protocol=2,  # the replies _Resp gives (redis-py 8 defaults to RESP3: maps, not lists)
                )
                self._conn = pool.make_connection()
            self._conn.send_packed_command(self._conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(self._conn.read_response())
                except redis.exceptions.NoScriptError as e:  # redis-py strips the code
                    replies.append(_ErrorReply(f"NOSCRIPT {e}"))
                except redis.ResponseError as e:
                    replies.append(_ErrorReply(str(e)))
            return replies
        except (redis.RedisError, OSError) as e:
            self.close()
            raise StoreError(f"redis {_safe_url(self.url)}: {e}") from e

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.disconnect()
            except Exception:
                pass
            self._conn = None


class RedisStore:
    """Greylist records in Redis, one hash per record, shared by several MX hosts.

    `url` is a redis://, unix:// or rediss:// URL (see parse_redis_url; rediss:// goes
    through redis-py).  The connection is made on first use.  Each call, connecting
    included, may take `timeout` seconds; nothing is retried, so a dead server raises
    StoreError at once.
    """

    def __init__(self, url: str, *, timeout: float, prefix: str = "tarpit:greylist:"):
        self.url = url
        self.timeout = timeout
        self.prefix = prefix
        self._conn: Any = None

    def _transport(self) -> Any:
        if self._conn is None:
            kind = _RedisPy if self.url.startswith(_REDIS_PY_SCHEMES) else _Resp
            self._conn = kind(self.url, self.timeout)
        return self._conn

    def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one round trip; return their replies.  An error reply raises StoreError."""
        replies = self._transport().execute(commands)
        for reply in replies:
            if isinstance(reply, _ErrorReply):
                raise StoreError(f"redis {_safe_url(self.url)}: {reply.text}")
        return replies

    def _run(self, fn, *args):
        """Run fn(*args); a bad URL or a record that does not parse raises StoreError too."""
        try:
            return fn(*args)
        except StoreError:
            raise
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise StoreError(f"redis {_safe_url(self.url)}: bad URL or record: {e}") from e

    def _key(self, table: str, client: str, sender: str = "", rcpt: str = "") -> str:
        if table != TRIPLE:
            return f"{self.prefix}{table}:{client}"
        digest = _sha1_hex(f"{sender}\0{rcpt}".encode("utf-8", "replace"))[:24]
        return f"{self.prefix}{table}:{client}#{digest}"

    def _record(self, flat: list[str] | None) -> Record | None:
        h = dict(zip(flat[::2], flat[1::2])) if flat else {}
        if "until" not in h:
            return None
        return Record(
            h["tbl"], h["client"], h["sender"], h["rcpt"], float(h["first"]), float(h["last"]),
            int(h["count"]), float(h["until"]), h["passed"] == "1",
        )

    def view(self, client: str, sender: str, rcpt: str, now: float) -> View:
        """Return the live white, tarpit and triple records of client/triple.  Raises StoreError."""

        def read() -> View:
            keys = (self._key(WHITE, client), self._key(TARPIT, client), self._key(TRIPLE, client, sender, rcpt))
            recs = [self._record(h) for h in self._execute([("HGETALL", k) for k in keys])]
            white, tarpit, triple = (x if x is not None and x.live(now) else None for x in recs)
            return View(white, tarpit, triple)

        return self._run(read)

    def hit(self, table: str, client: str, sender: str, rcpt: str, now: float, hit: Hit) -> tuple[Record, bool]:
        """Apply `hit` atomically (one Lua call); return (new record, True if created).  Raises StoreError."""

        def update() -> tuple[Record, bool]:
            key = self._key(table, client, sender, rcpt)
            args = (
                repr(float(now)), repr(float(hit.ttl)), hit.add,
                "" if hit.count_before is None else repr(float(hit.count_before)),
                "" if hit.pass_at is None else hit.pass_at,
                "1" if hit.set_passed else "0", table, client, sender, rcpt,
            )
            (reply,) = self._transport().execute([("EVALSHA", _lua_sha(), 1, key, *args)])
            if isinstance(reply, _ErrorReply) and reply.text.startswith("NOSCRIPT"):
                reply = self._execute([("EVAL", _LUA_HIT, 1, key, *args)])[0]  # once per server start
            elif isinstance(reply, _ErrorReply):
                raise StoreError(f"redis {_safe_url(self.url)}: {reply.text}")
            created, flat = reply
            rec = self._record(flat)
            if rec is None:
                raise StoreError(f"redis {_safe_url(self.url)}: record {key} vanished")
            return rec, bool(int(created))

        return self._run(update)

    def remove(self, table: str, client: str, sender: str = "", rcpt: str = "") -> int:
        """Delete one record; return how many were deleted (0 or 1).  Raises StoreError."""
        return self._run(lambda: int(self._execute([("DEL", self._key(table, client, sender, rcpt))])[0]))

    def _delete_keys(self, keys: list[str]) -> int:
        return sum(int(self._execute([("DEL", *keys[i:i + _BATCH])])[0]) for i in range(0, len(keys), _BATCH))

    def _keys(self, pattern: str) -> list[str]:
        """Every key matching `pattern` (SCAN, so the server is never blocked long)."""
        keys: dict[str, None] = {}
        cursor = "0"
        while True:
            cursor, batch = self._execute([("SCAN", cursor, "MATCH", pattern, "COUNT", _BATCH)])[0]
            keys.update(dict.fromkeys(batch))
            if cursor == "0":
                return list(keys)

    def delete(self, client: str, sender: str | None = None, rcpt: str | None = None) -> int:
        """Delete all records of `client`, or only its triple when sender and rcpt are given.

        Returns how many records were deleted.  Raises StoreError.
        """
        if sender is not None and rcpt is not None:
            return self.remove(TRIPLE, client, sender, rcpt)

        def drop() -> int:
            pattern = f"{_glob_escape(self.prefix)}{TRIPLE}:{_glob_escape(client)}#*"
            return self._delete_keys([self._key(WHITE, client), self._key(TARPIT, client), *self._keys(pattern)])

        return self._run(drop)

    def _scan(self) -> Iterator[Record]:
        keys = self._keys(_glob_escape(self.prefix) + "*")
        for start in range(0, len(keys), _BATCH):
            for h in self._execute([("HGETALL", k) for k in keys[start:start + _BATCH]]):
                rec = self._record(h)
                if rec is not None:
                    yield rec

    def records(self, now: float | None = None) -> list[Record]:
        """Return all records (live ones only when `now` is given), by table and client.  Raises StoreError."""

        def collect() -> list[Record]:
            recs = [x for x in self._scan() if now is None or x.live(now)]
            return sorted(recs, key=lambda x: (x.table, x.client, x.sender, x.rcpt))

        return self._run(collect)

    def purge(self, now: float) -> int:
        """Delete the records expired at `now` (TTLs remove most on their own); return how many.

        Raises StoreError.
        """

        def drop() -> int:
            dead = [self._key(x.table, x.client, x.sender, x.rcpt) for x in self._scan() if not x.live(now)]
            return self._delete_keys(dead)

        return self._run(drop)

    def close(self) -> None:
        """Drop the connection (a later call reconnects)."""
        if self._conn is not None:
            self._conn.close()


_lua_sha_hex: list[str] = []


def _lua_sha() -> str:
    if not _lua_sha_hex:
        _lua_sha_hex.append(_sha1_hex(_LUA_HIT.encode()))
    return _lua_sha_hex[0]

def sqlite_path(url: str) -> str:
    """Return the file path of a "sqlite:///path" URL or a plain path."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        return rest if rest.startswith("/") or rest == ":memory:" else rest.lstrip("/")
    return url
