"""Control lists: qmail-style text files, optionally compiled to CDB.

Public names:
  KINDS          the list kinds with their own key rules: badheloarg, rcptusers, plain
  kind_of        the kind for a list name or file name ("rcptusers.new" -> "rcptusers")
  normalise_key  the form a key is looked up in (lower case; badheloarg drops a trailing dot)
  parse_text     text of a list -> its normalised keys; the one parser (ControlError on a bad line)
  ControlList    one list, loaded once: NAME.cdb when it exists, else the text file NAME
  stale_cdb      whether NAME is newer than NAME.cdb (the CDB is still the one in use)
  helo_refused   why a HELO/EHLO argument is refused ("empty", "listed", "nodot"), or None
  rcpt_candidates the keys rcpt_valid tries for an address, in order
  rcpt_valid     whether rcptusers accepts a RCPT address
  compile_cdb    text list -> CDB, written to a temp file, fsynced and renamed over the old one

Text format (docs/control.md): one key a line; blank lines are ignored; `#` at
the start of a line or after a space or tab starts a comment (so `a#b` is a
key); keys are stored lower case.  CDB format: key = normalised key as UTF-8,
value = b"" (any value is accepted on reading).  A CDB is checked in full when
it is loaded, so a corrupt file fails at start-up, never in the middle of a
lookup.
"""

from __future__ import annotations

import os
import re
import stat
import struct

TYPE_CHECKING = False  # typing, tempfile and ipaddress are loaded only where used:
if TYPE_CHECKING:      # this module is imported on the proxy path of every connection
    from typing import BinaryIO, Iterable

import cdblib

from libtarpit.errors import ControlError

KINDS = ("badheloarg", "rcptusers", "plain")

_COMMENT = re.compile(r"(?:^|[ \t])#.*", re.S)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"(?:@(.*))?', re.S)
# surrogate escapes (bytes that were not UTF-8), whitespace, and category Cc
_BAD_CHAR = re.compile(r"[\udc80-\udcff\s\x00-\x1f\x7f-\x9f]")
_QUOTE_OR_ANGLE = re.compile(r'["<>]')
_PAIR = struct.Struct("<LL")
_HEADER = 256 * _PAIR.size
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


def _read(path: str) -> bytes | None:
    """Return the bytes of a regular file, None when it does not exist; ControlError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang us
    except FileNotFoundError:
        if os.path.lexists(path):
            raise ControlError(path, "dangling symbolic link") from None
        return None
    except OSError as e:
        raise ControlError(path, e.strerror or str(e)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ControlError(path, "is a directory" if stat.S_ISDIR(mode) else "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise ControlError(path, e.strerror or str(e)) from None
    finally:
        os.close(fd)


def _cdb_index(data: bytes, path: str) -> list[tuple[int, int]]:
    if len(data) < _HEADER:
        raise ControlError(path, f"CDB truncated: {len(data)} bytes, the header alone is {_HEADER}")
    index = [_PAIR.unpack_from(data, i * _PAIR.size) for i in range(256)]
    for n, (pos, slots) in enumerate(index):
        if pos < _HEADER or pos + slots * _PAIR.size > len(data):
            raise ControlError(path, f"CDB corrupt: hash table {n} lies outside the file")
    return index


def _cdb_records(data: bytes, end: int, path: str) -> dict[int, bytes]:
    """Return {offset: key} for every record between the header and the first table."""
    records: dict[int, bytes] = {}
    pos = _HEADER
    while pos < end:
        if pos + _PAIR.size > end:
            raise ControlError(path, f"CDB corrupt: record at byte {pos} is cut short")
        klen, dlen = _PAIR.unpack_from(data, pos)
        stop = pos + _PAIR.size + klen + dlen
        if stop > end:
            raise ControlError(path, f"CDB corrupt: record at byte {pos} runs past its end")
        records[pos] = data[pos + _PAIR.size:pos + _PAIR.size + klen]
        pos = stop
    return records


def _cdb_tables(data: bytes, index: list[tuple[int, int]], records: dict[int, bytes], path: str) -> None:
    """Check that every slot points at a record with its hash and no table is full."""
    seen: set[int] = set()
    for n, (pos, slots) in enumerate(index):
        used = 0
        for s, (h, rec) in enumerate(_PAIR.iter_unpack(data[pos:pos + slots * _PAIR.size])):
            if not rec:
                continue
            key = records.get(rec)
            if key is None or h & 0xFF != n or cdblib.djb_hash(key) & 0xFFFFFFFF != h:
                raise ControlError(path, f"CDB corrupt: hash table {n} slot {s} points to no matching record")
            seen.add(rec)
            used += 1
        if slots and used == slots:  # a lookup that misses would probe forever
            raise ControlError(path, f"CDB corrupt: hash table {n} has no empty slot")
    lost = set(records) - seen
    if lost:
        raise ControlError(path, f"CDB corrupt: record at byte {min(lost)} is in no hash table")


def _cdb_keys(records: Iterable[bytes], path: str, kind: str) -> None:
    """Check that every key is UTF-8 and already in the form the text parser gives."""
    for raw in records:
        try:
            key = raw.decode("utf-8")
            good = _parse_key(key, kind) == key
        except (UnicodeDecodeError, ValueError):
            good = False
        if not good:
            raise ControlError(path, f"CDB key {raw!r} is not a normalised {kind} key; "
                                     "rebuild it with tarpitctl cdb")


def _check_cdb(data: bytes, path: str, kind: str) -> int:
    """Validate a whole CDB image; return its number of records; ControlError if corrupt."""
    index = _cdb_index(data, path)
    records = _cdb_records(data, min(pos for pos, _ in index), path)
    _cdb_tables(data, index, records, path)
    _cdb_keys(records.values(), path, kind)
    return len(records)


class ControlList:
    """One control list, loaded once per process.

    `path` is the file in use (NAME.cdb or NAME), `kind` the key rules,
    `format` "cdb" or "text".  `key in lst` is case-insensitive.
    """

    def __init__(self, path: str, kind: str, keys: frozenset[str] | None = None,
                 reader: cdblib.Reader | None = None, size: int = 0):
        self.path = path
        self.kind = kind
        self.format = "text" if reader is None else "cdb"
        self._keys = keys if keys is not None else frozenset()
        self._reader = reader
        self._size = len(self._keys) if reader is None else size

    @classmethod
    def load(cls, directory: str, name: str) -> ControlList | None:
        """Return the list NAME from `directory`, or None when neither NAME.cdb nor NAME exists.

        NAME.cdb wins when present (even if NAME is newer: see stale_cdb).
        Raises ControlError when a file exists but cannot be read (a
        directory, a FIFO, a dangling link, an I/O error) or is corrupt.
        """
        kind = kind_of(name)
        base = os.path.join(directory, name)
        data = _read(base + ".cdb")
        if data is not None:
            return cls.from_cdb_bytes(data, base + ".cdb", kind)
        data = _read(base)
        if data is None:
            return None
        keys = parse_text(data.decode("utf-8", "surrogateescape"), base, kind)
        return cls(base, kind, keys=frozenset(keys))

    @classmethod
    def from_cdb_bytes(cls, data: bytes, path: str, kind: str = "plain") -> ControlList:
        """Return a list over a CDB image (checked in full first); ControlError if corrupt."""
        size = _check_cdb(data, path, kind)
        return cls(path, kind, reader=cdblib.Reader.from_bytes(data), size=size)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        key = normalise_key(key, self.kind)
        if self._reader is None:
            return key in self._keys
        try:
            return self._reader.get(key.encode("utf-8")) is not None
        except UnicodeEncodeError:
            return False

    def __len__(self) -> int:
        return self._size

    def keys(self) -> frozenset[str]:
        """Return every key of the list (for tarpitctl check and tests)."""
        if self._reader is None:
            return self._keys
        return frozenset(k.decode("utf-8") for k in self._reader.iterkeys())

    def __repr__(self) -> str:
        return f"ControlList({self.path!r}, {self.format}, {self._size} keys)"


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


def _is_address_literal(name: str) -> bool:
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    import ipaddress

    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def helo_refused(arg: str, badheloarg: ControlList | None) -> str | None:
    """Return why a HELO/EHLO argument is refused, or None when it is accepted.

    "empty": nothing but whitespace.  "listed": in badheloarg, case-insensitive,
    as given or without one trailing dot.  "nodot": no '.' once a trailing dot
    is dropped, unless it is an address literal ([192.0.2.1], [IPv6:2001:db8::1]).
    The empty and nodot checks apply even when badheloarg is None, as in
    seed 003's patch.  Never raises.
    """
    name = arg.strip()
    if not name:
        return "empty"
    if badheloarg is not None and (name in badheloarg or name.removesuffix(".") in badheloarg):
        return "listed"
    if "." not in name.removesuffix(".") and not _is_address_literal(name):
        return "nodot"
    return None


def _split_address(address: str) -> tuple[str, str]:
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
    """Return the keys rcpt_valid looks up for `address`, in order ([] for the null path).

    local@domain, local, @domain, then qmail's extension fallback on the local
    part: a-b-c -> a-b-default@domain, a-b-default, a-default@domain, a-default.
    Outer quotes of a quoted local part are removed, nothing else is unescaped;
    a local part that is empty or still holds an '@' ("a@b"@example.com) can
    match no key, so only @domain is tried for it.
    """
    local, domain = _split_address(address)
    at = "@" + domain if domain else ""
    if not local or "@" in local:
        return [at] if at else []
    out = [local + at, local, at] if at else [local]
    parts = local.split("-")
    for i in range(len(parts) - 1, 0, -1):
        base = "-".join(parts[:i]) + "-default"
        out += [base + at, base] if at else [base]
    return list(dict.fromkeys(out))


def rcpt_valid(address: str, rcptusers: ControlList | None) -> bool:
    """Return True when rcptusers accepts the RCPT path `address` (without < >).

    None (no list) accepts everyone; "postmaster" at any domain is always accepted
    (RFC 5321 4.5.1).  The null path "" is never a recipient.
    Lookup order: see rcpt_candidates.  Never raises.
    """
    local, _domain = _split_address(address)
    if (local, _domain) == ("", ""):
        return False
    if rcptusers is None or local.lower() == "postmaster":
        return True  # RFC 5321 4.5.1: postmaster must always be accepted
    return any(c in rcptusers for c in rcpt_candidates(address))


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


def _write_cdb(f: BinaryIO, keys: list[str]) -> bytes:
    writer = cdblib.Writer(f)
    for key in keys:
        writer.put(key.encode("utf-8"), b"")
    writer.finalize()
    f.flush()
    f.seek(0)
    return f.read()


def _verify(image: bytes, path: str, kind: str, keys: list[str]) -> None:
    lst = ControlList.from_cdb_bytes(image, path, kind)
    if len(lst) != len(keys) or not all(k in lst for k in keys):
        raise ControlError(path, "the CDB just written does not give back every key")


def _write_atomic(out: str, keys: list[str], kind: str) -> None:
    directory = os.path.dirname(out) or "."
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as f:
            _verify(_write_cdb(f, keys), tmp, kind, keys)
            os.fchmod(f.fileno(), _out_mode(out))
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def compile_cdb(src: str, out: str | None = None, kind: str | None = None) -> int:
    """Compile the text list `src` to the CDB `out` (default src + ".cdb"); return its key count.

    `kind` defaults to kind_of(src).  The CDB goes to a temp file in out's
    directory, is read back and checked, fsynced, and renamed over `out`, so a
    reader sees the old file or the new one, never half of one; the old mode
    bits are kept (new files get 0644).
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
        _write_atomic(out, keys, kind)
    except OSError as e:
        raise ControlError(out, e.strerror or str(e)) from None
    return len(keys)
