"""Control lists: qmail-style text files, optionally compiled to CDB.

Public names:
  KINDS          the list kinds with their own key rules: badheloarg, rcptusers, plain
  kind_of        the kind for a list name or file name ("rcptusers.new" -> "rcptusers")
  normalise_key  the form a key is looked up in (lower case; badheloarg drops a trailing dot)
  parse_text     text of a list -> its normalised keys; the one parser (ControlError on a bad line)
  ControlList    one list, loaded once: NAME.cdb when it exists (looked up in the file),
                 else the text file NAME (read whole)
  stale_cdb      whether NAME is newer than NAME.cdb (the CDB is still the one in use)
  split_address  a RCPT path -> (local part, domain), lower case, outer quotes and route removed
  rcpt_candidates the keys an rcptusers lookup tries for an address, in order
  compile_cdb    text list -> CDB, written to a temp file, fsynced and renamed over the old one

Text format (docs/control.md): one key a line; blank lines are ignored; `#` at
the start of a line or after a space or tab starts a comment (so `a#b` is a
key); keys are stored lower case.  CDB format: key = normalised key as UTF-8,
value = b"" (any value is accepted on reading).

A CDB is never read whole on the connection path: load() reads its 2 KiB
header and checks that every hash table lies inside the file; a lookup reads
a few slots and one record with pread, checking every offset, so a corrupt
file gives ControlError, never an IndexError or an endless probe.  The full
O(n) check (every record, slot and key) runs at compile time and, with a
cache_dir, once per file identity (device, inode, size, mtime_ns): verdicts
are remembered in cache_dir/cdb-verified.  A text list is read and parsed
whole on every load: compile big lists.
"""

from __future__ import annotations

import os
import re
import stat
import struct

TYPE_CHECKING = False  # typing, tempfile and ipaddress are loaded only where used:
if TYPE_CHECKING:      # this module is imported on the proxy path of every connection
    from typing import BinaryIO, Iterator

from libtarpit.errors import ControlError

# cdblib (1.6 ms to import) is loaded only to write a CDB and for the full check;
# lookups hash in Python: keys are short, and a connection does a handful.

KINDS = ("badheloarg", "rcptusers", "plain")

_COMMENT = re.compile(r"(?:^|[ \t])#.*", re.S)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"(?:@(.*))?', re.S)
# surrogate escapes (bytes that were not UTF-8), whitespace, and category Cc
_BAD_CHAR = re.compile(r"[\udc80-\udcff\s\x00-\x1f\x7f-\x9f]")
_QUOTE_OR_ANGLE = re.compile(r'["<>]')
_PAIR = struct.Struct("<LL")
_INDEX = struct.Struct("<512L")
_HEADER = 256 * _PAIR.size
_CHUNK = 1 << 20           # bytes read at a time when walking the records
CACHE_NAME = "cdb-verified"  # in cache_dir: one verdict a line, the newest CACHE_KEEP kept
CACHE_KEEP = 16
_DEFAULT_MODE = 0o644


def kind_of(name: str) -> str:
    """Return the kind whose key rules apply to a list called `name`.

    The base name up to its first dot decides: "badheloarg", "rcptusers",
    "/x/rcptusers.new" -> "rcptusers"; anything else is "plain".  Never raises.
    """
    stem = os.path.basename(name).split(".", 1)[0]
    return stem if stem in KINDS else "plain"


def normalise_key(key: str, kind: str = "plain") -> str:
    """Return `key` as it is looked up: lower case; for badheloarg without one trailing dot.

    Does not validate; never raises.
    """
    key = key.lower()
    if kind == "badheloarg" and len(key) > 1:
        key = key.removesuffix(".")
    return key


def _check_chars(key: str) -> str | None:
    bad = _BAD_CHAR.search(key)  # one regex pass: loading a 100k-key CDB stays fast
    if bad is None:
        return None
    ch = bad.group()
    if "\udc80" <= ch <= "\udcff":
        return "not UTF-8"
    if ch.isspace():
        return "whitespace inside a key"
    return f"control character U+{ord(ch):04X}"


def _check_rcpt(key: str) -> str | None:
    if _QUOTE_OR_ANGLE.search(key):
        return "write the address without quotes or angle brackets"
    if key.count("@") > 1:
        return "more than one '@'"
    if key.endswith("@"):
        return "nothing after '@'"
    return None


def _parse_key(text: str, kind: str) -> str:
    """Return the normalised key for one non-empty, comment-free line; ValueError(reason)."""
    key = normalise_key(text, kind)
    if kind == "rcptusers" and "@" in key:
        key = key.removesuffix(".")  # user@example.com. is user@example.com
    reason = _check_chars(key) or (_check_rcpt(key) if kind == "rcptusers" else None)
    if reason:
        raise ValueError(reason)
    if not key or (kind == "badheloarg" and key == "."):
        raise ValueError("empty key")
    return key


def parse_text(text: str, source: str, kind: str = "plain") -> list[str]:
    """Return the normalised keys of a list's text, in file order, without duplicates.

    `source` names the file in errors; `kind` selects the key rules (KINDS).
    Lines are split on "\\n" only, so line numbers match `sed -n`; a leading
    BOM and trailing CR are dropped.  Bytes that were not UTF-8 must come in
    as surrogate escapes (decode with errors="surrogateescape"): they are an
    error in a key and allowed in a comment.
    Raises ControlError(source, reason, line) for the first bad line.
    """
    keys: dict[str, None] = {}
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        body = _COMMENT.sub("", raw).strip(" \t\r")
        if not body:
            continue
        try:
            keys[_parse_key(body, kind)] = None
        except ValueError as e:
            raise ControlError(source, str(e), number) from None
    return list(keys)


def _open(path: str) -> tuple[int, os.stat_result] | None:
    """Return (fd, stat) of a regular file, None when it does not exist; ControlError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang us
    except FileNotFoundError:
        if os.path.lexists(path):
            raise ControlError(path, "dangling symbolic link") from None
        return None
    except OSError as e:
        raise ControlError(path, e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ControlError(path, "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise ControlError(path, e.strerror or str(e)) from None
        raise
    return fd, st


def _read(path: str) -> bytes | None:
    """Return the bytes of a regular file, None when it does not exist; ControlError otherwise."""
    opened = _open(path)
    if opened is None:
        return None
    fd = opened[0]
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise ControlError(path, e.strerror or str(e)) from None
    finally:
        os.close(fd)


def _djb_hash(key: bytes) -> int:
    """Return CDB's hash of `key` (the same as cdblib.djb_hash, without importing it)."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) ^ c) & 0xFFFFFFFF
    return h


class _Cdb:
    """A CDB read a few bytes at a time through `read(offset, length) -> bytes`.

    The constructor checks the header (ControlError when the file is shorter
    than it or a hash table lies outside the file); every other read is
    bounds-checked when it happens.  Records lie in [header, end).
    """

    def __init__(self, read, size: int, path: str, fd: int | None = None):
        """Take over `fd` (closed here if the header is bad); ControlError for a bad header."""
        self._read = read
        self._fd = fd
        self.path = path
        try:
            self._check_header(size)
        except BaseException:
            self.close()
            raise

    def _check_header(self, size: int) -> None:
        path = self.path
        if size < _HEADER:
            raise ControlError(path, f"CDB truncated: {size} bytes, the header alone is {_HEADER}")
        flat = _INDEX.unpack(self._get(0, _HEADER))
        self.index = list(zip(flat[0::2], flat[1::2]))
        for n, (pos, slots) in enumerate(self.index):
            if pos < _HEADER or pos + slots * _PAIR.size > size:
                raise ControlError(path, f"CDB corrupt: hash table {n} lies outside the file")
        self.end = min(pos for pos, _ in self.index)

    def close(self) -> None:
        """Close the file (lookups fail after this); never raises."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()

    def _get(self, pos: int, n: int) -> bytes:
        try:
            data = self._read(pos, n)
        except OSError as e:
            raise ControlError(self.path, e.strerror or str(e)) from None
        if len(data) != n:
            raise ControlError(self.path, f"CDB corrupt: {n} bytes at byte {pos} run past the end of the file")
        return data

    def has(self, key: bytes) -> bool:
        """Return whether `key` is a key of the CDB; ControlError when the probe meets damage."""
        h = _djb_hash(key)
        pos, slots = self.index[h & 0xFF]
        first = (h >> 8) % slots if slots else 0
        for i in range(slots):  # at most every slot once: a full table cannot loop
            slot_hash, rec = _PAIR.unpack(self._get(pos + (first + i) % slots * _PAIR.size, _PAIR.size))
            if not rec:
                return False
            if slot_hash != h:
                continue
            if rec < _HEADER or rec + _PAIR.size > self.end:
                raise ControlError(self.path, f"CDB corrupt: hash table {h & 0xFF} points outside the records")
            klen, dlen = _PAIR.unpack(self._get(rec, _PAIR.size))
            if rec + _PAIR.size + klen + dlen > self.end:
                raise ControlError(self.path, f"CDB corrupt: record at byte {rec} runs past its end")
            if klen == len(key) and self._get(rec + _PAIR.size, klen) == key:
                return True
        if slots:
            raise ControlError(self.path, f"CDB corrupt: hash table {h & 0xFF} has no empty slot")
        return False

    def records(self) -> Iterator[tuple[int, bytes]]:
        """Yield (offset, key) for every record in file order; ControlError if one is cut short."""
        pos, buf, base = _HEADER, b"", _HEADER
        while pos < self.end:
            if pos + _PAIR.size > self.end:
                raise ControlError(self.path, f"CDB corrupt: record at byte {pos} is cut short")
            if pos + _PAIR.size > base + len(buf):
                buf, base = self._get(pos, min(_CHUNK, self.end - pos)), pos
            klen, dlen = _PAIR.unpack_from(buf, pos - base)
            stop = pos + _PAIR.size + klen + dlen
            if stop > self.end:
                raise ControlError(self.path, f"CDB corrupt: record at byte {pos} runs past its end")
            if pos + _PAIR.size + klen > base + len(buf):
                buf, base = self._get(pos, max(min(_CHUNK, self.end - pos), _PAIR.size + klen)), pos
            yield pos, buf[pos - base + _PAIR.size:pos - base + _PAIR.size + klen]
            pos = stop

    def verify(self, kind: str) -> int:
        """Check every record, slot and key; return the record count; ControlError if corrupt.

        Memory: about 9 bytes a record (offsets, hashes, a seen flag), never the keys.
        """
        from array import array
        from bisect import bisect_left

        from cdblib import djb_hash

        starts, hashes = array("I"), array("I")
        bad_key = None  # reported after the tables: a damaged record is "corrupt", not "not normalised"
        for rec, key in self.records():
            if bad_key is None and not _good_cdb_key(key, kind):
                bad_key = key
            starts.append(rec)
            hashes.append(djb_hash(key) & 0xFFFFFFFF)
        seen = bytearray(len(starts))
        for n, (pos, slots) in enumerate(self.index):
            table = list(_PAIR.iter_unpack(self._get(pos, slots * _PAIR.size)))
            if slots and all(rec for _, rec in table):  # a lookup that misses would probe it all
                raise ControlError(self.path, f"CDB corrupt: hash table {n} has no empty slot")
            for s, (h, rec) in enumerate(table):
                if not rec:
                    continue
                i = bisect_left(starts, rec)
                if i == len(starts) or starts[i] != rec or hashes[i] != h or h & 0xFF != n:
                    raise ControlError(self.path, f"CDB corrupt: hash table {n} slot {s} points to no matching record")
                if seen[i]:
                    raise ControlError(self.path, f"CDB corrupt: hash table {n} slot {s} points to a record "
                                                  "another slot points to")
                seen[i] = 1
        if seen.count(0):
            raise ControlError(self.path, f"CDB corrupt: record at byte {starts[seen.index(0)]} is in no hash table")
        if bad_key is not None:
            raise ControlError(self.path, f"CDB key {bad_key!r} is not a normalised {kind} key; "
                                          "rebuild it with tarpitctl cdb")
        return len(starts)


def _good_cdb_key(raw: bytes, kind: str) -> bool:
    """Return whether `raw` is UTF-8 and already in the form the text parser gives."""
    try:
        key = raw.decode("utf-8")
        return _parse_key(key, kind) == key
    except (UnicodeDecodeError, ValueError):
        return False


def _identity(st: os.stat_result, kind: str) -> str:
    """Return the five fields a verdict is remembered under (no spaces inside any)."""
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {kind}"


def _cache_lines(cache_dir: str) -> list[tuple[str, str, str]]:
    """Return the cache's lines as (verdict, identity, reason); [] when it cannot be read."""
    try:
        with open(os.path.join(cache_dir, CACHE_NAME), "rb") as f:
            text = f.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in text.split("\n"):
        fields = line.split(" ", 6)
        if len(fields) >= 6 and fields[0] in ("ok", "bad"):
            out.append((fields[0], " ".join(fields[1:6]), fields[6] if len(fields) > 6 else ""))
    return out


def _cached_verdict(cache_dir: str, identity: str) -> str | None:
    """Return "ok", or the reason a file with `identity` was found corrupt, or None if unknown."""
    for verdict, ident, reason in reversed(_cache_lines(cache_dir)):
        if ident == identity:
            return "ok" if verdict == "ok" else (reason or "CDB corrupt")
    return None


def _remember_verdict(cache_dir: str, identity: str, reason: str | None) -> None:
    """Record that the file `identity` was verified (reason None) or found corrupt.

    Keeps the newest CACHE_KEEP lines; written to a temp file and renamed, so
    readers never see half a file.  Raises OSError when cache_dir is not writable.
    """
    path = os.path.join(cache_dir, CACHE_NAME)
    kept = [f"{v} {i} {r}".rstrip() for v, i, r in _cache_lines(cache_dir) if i != identity]
    line = f"ok {identity}" if reason is None else f"bad {identity} {reason}".replace("\n", " ")
    lines = kept[-(CACHE_KEEP - 1):] + [line]
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _verify_once(cdb: _Cdb, identity: str, cache_dir: str, kind: str) -> int | None:
    """Run cdb.verify once per file identity; return the key count when it ran now, else None.

    A remembered "corrupt" raises ControlError at once.  While another process
    holds the lock (it is verifying this file), or when cache_dir cannot be
    locked, only the header check done at open stands.
    """
    verdict = _cached_verdict(cache_dir, identity)
    if verdict == "ok":
        return None
    if verdict is not None:
        raise ControlError(cdb.path, verdict)
    try:
        lock = os.open(os.path.join(cache_dir, CACHE_NAME + ".lock"), os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return None  # no writable cache: the header check and checked lookups only
    try:
        import fcntl

        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # someone else is verifying it right now
        try:
            count = cdb.verify(kind)
        except ControlError as e:
            _remember_quietly(cache_dir, identity, e.reason)
            raise
        _remember_quietly(cache_dir, identity, None)
        return count
    finally:
        os.close(lock)


def _remember_quietly(cache_dir: str, identity: str, reason: str | None) -> None:
    try:
        _remember_verdict(cache_dir, identity, reason)
    except OSError:
        pass  # the next connection verifies again: slower, never wrong


class ControlList:
    """One control list, loaded once per process.

    `path` is the file in use (NAME.cdb or NAME), `kind` the key rules,
    `format` "cdb" or "text".  `key in lst` is case-insensitive; for a CDB it
    reads the file and raises ControlError when it meets a damaged part.
    For a CDB, len() and keys() walk the whole file (O(n): fine for
    tarpitctl, not for the connection path); verify() checks it all.
    """

    def __init__(self, path: str, kind: str, keys: frozenset[str] | None = None,
                 cdb: _Cdb | None = None, size: int | None = None):
        self.path = path
        self.kind = kind
        self.format = "text" if cdb is None else "cdb"
        self._keys = keys if keys is not None else frozenset()
        self._cdb = cdb
        self._size = len(self._keys) if cdb is None else size

    @classmethod
    def load(cls, directory: str, name: str, *, cache_dir: str | None = None) -> ControlList | None:
        """Return the list NAME from `directory`, or None when neither NAME.cdb nor NAME exists.

        NAME.cdb wins when present (even if NAME is newer: see stale_cdb); it
        is opened, its header checked, and looked up in place.  With
        `cache_dir` (the wrapper's state directory) it is also checked in full
        the first time this file identity is seen, and the verdict remembered
        there; without one, or when cache_dir is not writable, damage past the
        header shows up at lookup time, as ControlError.  NAME (text) is read
        and parsed whole.
        Raises ControlError when a file exists but cannot be read (a
        directory, a FIFO, a dangling link, an I/O error) or is found corrupt.
        """
        kind = kind_of(name)
        base = os.path.join(directory, name)
        opened = _open(base + ".cdb")
        if opened is not None:
            return cls._from_fd(*opened, base + ".cdb", kind, cache_dir)
        data = _read(base)
        if data is None:
            return None
        keys = parse_text(data.decode("utf-8", "surrogateescape"), base, kind)
        return cls(base, kind, keys=frozenset(keys))

    @classmethod
    def _from_fd(cls, fd: int, st: os.stat_result, path: str, kind: str,
                 cache_dir: str | None) -> ControlList:
        cdb = _Cdb(lambda pos, n: os.pread(fd, n, pos), st.st_size, path, fd)
        size = None
        if cache_dir is not None:
            size = _verify_once(cdb, _identity(st, kind), cache_dir, kind)
        return cls(path, kind, cdb=cdb, size=size)

    @classmethod
    def from_cdb_bytes(cls, data: bytes, path: str, kind: str = "plain") -> ControlList:
        """Return a list over a CDB image (checked in full first); ControlError if corrupt."""
        cdb = _Cdb(lambda pos, n: data[pos:pos + n], len(data), path)
        size = cdb.verify(kind)
        return cls(path, kind, cdb=cdb, size=size)

    def verify(self) -> int:
        """Check a CDB in full (every record, slot and key); return the key count.

        O(n) time, 9 bytes of memory a key.  A text list was checked when it
        was parsed.  Raises ControlError when the CDB is corrupt.
        """
        if self._cdb is not None:
            self._size = self._cdb.verify(self.kind)
        return len(self)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        key = normalise_key(key, self.kind)
        if self._cdb is None:
            return key in self._keys
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return self._cdb.has(raw)

    def __len__(self) -> int:
        """Return the key count; for a CDB not yet counted, walks every record (ControlError if cut short)."""
        if self._size is None:
            assert self._cdb is not None
            self._size = sum(1 for _ in self._cdb.records())
        return self._size

    def keys(self) -> frozenset[str]:
        """Return every key of the list (for tarpitctl check and tests); O(n) for a CDB.

        Raises ControlError for a CDB record that is cut short or not UTF-8.
        """
        if self._cdb is None:
            return self._keys
        try:
            return frozenset(k.decode("utf-8") for _, k in self._cdb.records())
        except UnicodeDecodeError:
            raise ControlError(self.path, "CDB key is not UTF-8; rebuild it with tarpitctl cdb") from None

    def __repr__(self) -> str:
        count = "? keys" if self._size is None else f"{self._size} keys"
        return f"ControlList({self.path!r}, {self.format}, {count})"


def stale_cdb(directory: str, name: str) -> bool:
    """Return True when both NAME and NAME.cdb exist and NAME was modified later.

    The CDB is what the wrapper uses, so edits to NAME have no effect until
    `tarpitctl cdb` is run.  Missing or unreadable files give False.
    """
    base = os.path.join(directory, name)
    try:
        return os.stat(base).st_mtime_ns > os.stat(base + ".cdb").st_mtime_ns
    except OSError:
        return False


def split_address(address: str) -> tuple[str, str]:
    """Return (local part, domain) lower case; domain "" when there is none."""
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if a.startswith("@") and ":" in a:
        a = a.split(":", 1)[1]  # RFC 5321 source route: ignored, as the RFC says
    quoted = _QUOTED.fullmatch(a)
    if quoted:
        local, domain = quoted.group(1), quoted.group(2) or ""
    elif "@" in a:
        local, _, domain = a.rpartition("@")
    else:
        local, domain = a, ""
    return local.lower(), domain.lower().removesuffix(".")


def rcpt_candidates(address: str) -> list[str]:
    """Return the keys an rcptusers lookup tries for `address`, in order ([] for the null path).

    local@domain, local, @domain, then qmail's extension fallback on the local
    part: a-b-c -> a-b-default@domain, a-b-default, a-default@domain, a-default.
    Outer quotes of a quoted local part are removed, nothing else is unescaped;
    a local part that is empty or still holds an '@' ("a@b"@example.com) can
    match no key, so only @domain is tried for it.
    """
    local, domain = split_address(address)
    at = "@" + domain if domain else ""
    if not local or "@" in local:
        return [at] if at else []
    out = [local + at, local, at] if at else [local]
    parts = local.split("-")
    for i in range(len(parts) - 1, 0, -1):
        base = "-".join(parts[:i]) + "-default"
        out += [base + at, base] if at else [base]
    return list(dict.fromkeys(out))


def _out_mode(out: str) -> int:
    try:
        return stat.S_IMODE(os.stat(out).st_mode)
    except OSError:
        return _DEFAULT_MODE  # readable by qmaild and friends, like qmail's own control files


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_cdb(f: BinaryIO, keys: list[str]) -> None:
    import cdblib

    writer = cdblib.Writer(f)
    for key in keys:
        writer.put(key.encode("utf-8"), b"")
    writer.finalize()
    f.flush()


def _verify(fd: int, path: str, kind: str, keys: list[str]) -> None:
    """Check the file written on `fd` in full, and that its records are exactly `keys`, in order."""
    cdb = _Cdb(lambda pos, n: os.pread(fd, n, pos), os.fstat(fd).st_size, path)  # fd stays ours
    total = cdb.verify(kind)  # every slot points at its record: the records are what lookups find
    count = 0
    for (_, got), want in zip(cdb.records(), keys):
        if got != want.encode("utf-8"):
            break
        count += 1
    if not count == total == len(keys):
        raise ControlError(path, "the CDB just written does not give back every key")


def _write_atomic(out: str, keys: list[str], kind: str) -> os.stat_result:
    """Write, check, fsync and rename; return the stat of the file now at `out`."""
    directory = os.path.dirname(out) or "."
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as f:
            _write_cdb(f, keys)
            _verify(f.fileno(), tmp, kind, keys)
            os.fchmod(f.fileno(), _out_mode(out))
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())  # the rename keeps inode and mtime: this is out's identity
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return st


def compile_cdb(src: str, out: str | None = None, kind: str | None = None,
                cache_dir: str | None = None) -> int:
    """Compile the text list `src` to the CDB `out` (default src + ".cdb"); return its key count.

    `kind` defaults to kind_of(src).  The CDB goes to a temp file in out's
    directory, is read back and checked, fsynced, and renamed over `out`, so a
    reader sees the old file or the new one, never half of one; the old mode
    bits are kept (new files get 0644).  With `cache_dir` (the wrapper's
    state directory) the new file is remembered there as verified, so no
    connection checks it again; a cache_dir that cannot be written is skipped.
    Raises ControlError(src, reason, line) for a line it cannot parse (old
    CDB untouched, no temp file left), ControlError with line None for an I/O
    error, ValueError when `out` is `src` itself.
    """
    out = out if out is not None else src + ".cdb"
    if os.path.realpath(out) == os.path.realpath(src):
        raise ValueError(f"{out}: output would overwrite the source list")
    kind = kind if kind is not None else kind_of(src)
    data = _read(src)
    if data is None:
        raise ControlError(src, "No such file or directory")
    keys = parse_text(data.decode("utf-8", "surrogateescape"), src, kind)
    try:
        st = _write_atomic(out, keys, kind)
    except OSError as e:
        raise ControlError(out, e.strerror or str(e)) from None
    if cache_dir is not None:
        _remember_quietly(cache_dir, _identity(st, kind), None)
    return len(keys)
