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

Every store method that talks to the store raises libtarpit.errors.StoreError on failure
(locked past the timeout, unreachable, too slow, corrupt); nothing else escapes.
A record is live while `until > now`; the clock is always the caller's `now`, so tests
can drive it.  Redis TTLs (and `purge` for SQLite) only collect the dead ones.
"""

from __future__ import annotations

import sqlite3
import time

from libtarpit.values import value

TYPE_CHECKING = False  # typing and dataclasses would add ~4 MB to every tarpitted connection
if TYPE_CHECKING:
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
        """
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

def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore:
    """Greylist records in Redis, one hash per record, shared by several MX hosts.

    `url` is a redis:// (or rediss://, unix://) URL.  redis-py is imported and the
    connection made on first use.  Socket connect and read timeouts are `timeout`
    seconds and nothing is retried, so a dead server raises StoreError at once.
    """

    def __init__(self, url: str, *, timeout: float, prefix: str = "tarpit:greylist:"):
        self.url = url
        self.timeout = timeout
        self.prefix = prefix
        self._client: Any = None
        self._script: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
            self._script = self._client.register_script(_LUA_HIT)
        return self._client

    def _run(self, fn, *args):
        """Run fn(client, *args); turn every redis failure into StoreError.

        A bad URL (ValueError at connect) and a record that does not parse
        (KeyError, ValueError) count as store failures too.
        """
        try:
            return fn(self._redis(), *args)
        except StoreError:
            raise
        except (KeyError, ValueError) as e:
            raise StoreError(f"redis {self._safe_url()}: bad URL or record: {e}") from e
        except Exception as e:
            if not _is_redis_error(e):
                raise
            raise StoreError(f"redis {self._safe_url()}: {e}") from e

    def _safe_url(self) -> str:
        return self.url.split("@", 1)[-1] if "@" in self.url else self.url

    def _key(self, table: str, client: str, sender: str = "", rcpt: str = "") -> str:
        if table != TRIPLE:
            return f"{self.prefix}{table}:{client}"
        import hashlib

        digest = hashlib.sha1(f"{sender}\0{rcpt}".encode("utf-8", "replace")).hexdigest()[:24]
        return f"{self.prefix}{table}:{client}#{digest}"

    def _record(self, h: dict[str, str]) -> Record | None:
        if not h or "until" not in h:
            return None
        return Record(
            h["tbl"], h["client"], h["sender"], h["rcpt"], float(h["first"]), float(h["last"]),
            int(h["count"]), float(h["until"]), h["passed"] == "1",
        )

    def view(self, client: str, sender: str, rcpt: str, now: float) -> View:
        """Return the live white, tarpit and triple records of client/triple.  Raises StoreError."""

        def read(r: Any) -> View:
            pipe = r.pipeline(transaction=False)
            for key in (self._key(WHITE, client), self._key(TARPIT, client), self._key(TRIPLE, client, sender, rcpt)):
                pipe.hgetall(key)
            recs = [self._record(h) for h in pipe.execute()]
            white, tarpit, triple = (x if x is not None and x.live(now) else None for x in recs)
            return View(white, tarpit, triple)

        return self._run(read)

    def hit(self, table: str, client: str, sender: str, rcpt: str, now: float, hit: Hit) -> tuple[Record, bool]:
        """Apply `hit` atomically (one Lua call); return (new record, True if created).  Raises StoreError."""

        def update(r: Any) -> tuple[Record, bool]:
            key = self._key(table, client, sender, rcpt)
            args = [
                repr(float(now)), repr(float(hit.ttl)), hit.add,
                "" if hit.count_before is None else repr(float(hit.count_before)),
                "" if hit.pass_at is None else hit.pass_at,
                "1" if hit.set_passed else "0", table, client, sender, rcpt,
            ]
            created, flat = self._script(keys=[key], args=args)
            rec = self._record(dict(zip(flat[::2], flat[1::2])))
            if rec is None:
                raise StoreError(f"redis {self._safe_url()}: record {key} vanished")
            return rec, bool(int(created))

        return self._run(update)

    def remove(self, table: str, client: str, sender: str = "", rcpt: str = "") -> int:
        """Delete one record; return how many were deleted (0 or 1).  Raises StoreError."""
        return self._run(lambda r: int(r.delete(self._key(table, client, sender, rcpt))))

    def delete(self, client: str, sender: str | None = None, rcpt: str | None = None) -> int:
        """Delete all records of `client`, or only its triple when sender and rcpt are given.

        Returns how many records were deleted.  Raises StoreError.
        """
        if sender is not None and rcpt is not None:
            return self.remove(TRIPLE, client, sender, rcpt)

        def drop(r: Any) -> int:
            keys = [self._key(WHITE, client), self._key(TARPIT, client)]
            pattern = f"{_glob_escape(self.prefix)}{TRIPLE}:{_glob_escape(client)}#*"
            keys += list(r.scan_iter(match=pattern, count=500))
            return int(r.delete(*keys))

        return self._run(drop)

    def _scan(self, r: Any) -> Iterator[Record]:
        keys = list(r.scan_iter(match=_glob_escape(self.prefix) + "*", count=500))
        for start in range(0, len(keys), 500):
            pipe = r.pipeline(transaction=False)
            for key in keys[start:start + 500]:
                pipe.hgetall(key)
            for h in pipe.execute():
                rec = self._record(h)
                if rec is not None:
                    yield rec

    def records(self, now: float | None = None) -> list[Record]:
        """Return all records (live ones only when `now` is given), by table and client.  Raises StoreError."""

        def collect(r: Any) -> list[Record]:
            recs = [x for x in self._scan(r) if now is None or x.live(now)]
            return sorted(recs, key=lambda x: (x.table, x.client, x.sender, x.rcpt))

        return self._run(collect)

    def purge(self, now: float) -> int:
        """Delete the records expired at `now` (TTLs remove most on their own); return how many.

        Raises StoreError.
        """

        def drop(r: Any) -> int:
            dead = [self._key(x.table, x.client, x.sender, x.rcpt) for x in self._scan(r) if not x.live(now)]
            return int(r.delete(*dead)) if dead else 0

        return self._run(drop)

    def close(self) -> None:
        """Drop the connection (a later call reconnects)."""
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None


def _is_redis_error(e: BaseException) -> bool:
    """True for redis-py errors and the OS-level socket errors it may let through."""
    import redis

    return isinstance(e, (redis.RedisError, OSError))


def sqlite_path(url: str) -> str:
    """Return the file path of a "sqlite:///path" URL or a plain path."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        return rest if rest.startswith("/") or rest == ":memory:" else rest.lstrip("/")
    return url
