"""tcprules CDB files (`tcpserver -x`), read with tcpserver's lookup order and meanings.

Public names:
  Rule         the rule that matched: action ("allow"/"deny"), key (the CDB key), env
  keys         the CDB keys tcpserver tries for a client, in order
  parse_value  the bytes of one CDB value -> (action, env)
  lookup       (path, ip, host=None, info=None) -> Rule, or None when no key matched
  apply        (env, rule) -> the environment the program gets

This follows ucspi-tcp 0.88 (Debian's `ucspi-tcp`): rules.c `doit()` for the
order, tcprules.c `main()` for the encoding and tcpserver.c `found()` and
`doit()` for the meaning (docs/serve.md quotes them).

Values: tcprules writes `deny` as the record "D", `allow` as nothing, and each
`,VAR="value"` as "+VAR=value", every record ended by a NUL.  tcpserver's
found() reads records in order: one starting with "D" denies, one starting with
"+" and holding "=" sets VAR; anything else, and bytes after the last NUL, are
ignored.  tcprules has no way to unset a variable (`,VAR` is "unable to parse
this line"), so `lookup` never gives None values; `apply` still unsets a name
whose value is None, the way tcpserver unsets TCPREMOTEINFO under -R.

The file is re-read when its identity (device, inode, size, mtime_ns) changes,
as tcpserver opens it for every connection; between changes a lookup costs one
stat() and a few probes in memory.  A file that is missing, unreadable or
corrupt raises ControlError: tcpserver then drops the connection ("unable to
read FILE") without running the program, unless -X, which serve does not take.
"""

from __future__ import annotations

import os
import stat
import struct

from libtarpit.errors import ControlError
from libtarpit.values import value

TYPE_CHECKING = False  # typing costs ~4 ms at import
if TYPE_CHECKING:
    from collections.abc import Mapping

    Env = tuple[tuple[str, "str | None"], ...]

__all__ = ["Rule", "apply", "keys", "lookup", "parse_value"]

_PAIR = struct.Struct("<LL")
_HEADER = 2048
_CACHE_KEEP = 4  # files kept in memory; a listener has one -x file


class Rule(value("Rule", "action key env", module=__name__)):
    """The rule that matched: `action` "allow" or "deny", `key` the CDB key as text,
    `env` ((name, value), ...) in file order (value None would mean unset)."""

    __slots__ = ()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # os.environ's own round trip to bytes


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def keys(ip: str, host: str | None = None, info: str | None = None) -> list[str]:
    """Return the keys tcpserver tries for a client, first to last (rules.c doit()).

    `ip` is TCPREMOTEIP; an IPv4-mapped IPv6 address ("::ffff:1.2.3.4") is
    looked up as the IPv4 address, as the IPv6 tcpserver does.  `host` is
    TCPREMOTEHOST and `info` TCPREMOTEINFO, None when not known (tcpserver sets
    them only under -h / -r, and the name only when it is not empty).
    Order: info@ip, info@=host, ip, =host, ip cut after each '.' (or ':' for
    IPv6) from the longest, =.suffix for each '.' in host from the longest,
    "=" (only when host is known), "" (the default).  Never raises.
    """
    if ip[:7].lower() == "::ffff:" and "." in ip:
        ip = ip[7:]
    out = []
    if info is not None:
        out.append(f"{info}@{ip}")
        if host is not None:
            out.append(f"{info}@={host}")
    out.append(ip)
    if host is not None:
        out.append(f"={host}")
    out += [ip[:n] for n in range(len(ip), 0, -1) if ip[n - 1] in ".:"]
    if host is not None:
        out += [f"={host[i:]}" for i, ch in enumerate(host) if ch == "."]
        out.append("=")
    out.append("")
    return out


def parse_value(data: bytes) -> tuple[str, Env]:
    """Return (action, env) for the bytes of one CDB value, read as tcpserver's found() reads it.

    Records are NUL-terminated; "D..." denies, "+NAME=value" sets NAME (the
    first "=" splits), anything else and bytes after the last NUL are ignored.
    A record with an empty NAME is skipped (no environment can hold it).
    Never raises.
    """
    deny = False
    env = []
    for record in data.split(b"\0")[:-1]:
        if record[:1] == b"D":
            deny = True
        elif record[:1] == b"+":
            name, eq, val = record[1:].partition(b"=")
            if eq and name:
                env.append((_text(name), _text(val)))
    return ("deny" if deny else "allow"), tuple(env)


def _hash(key: bytes) -> int:
    h = 5381
    for c in key:
        h = (((h << 5) + h) ^ c) & 0xFFFFFFFF
    return h


def _find(data: bytes, key: bytes, path: str) -> bytes | None:
    """Return the value of the first record with `key` (cdb_find), None if none; ControlError when damaged."""
    size = len(data)
    h = _hash(key)
    try:
        table, slots = _PAIR.unpack_from(data, (h & 0xFF) * 8)
        start = (h >> 8) % slots if slots else 0
        for i in range(slots):  # every slot at most once, as cdb_findnext: a full table cannot loop
            slot_hash, rec = _PAIR.unpack_from(data, table + (start + i) % slots * 8)
            if not rec:
                return None
            if slot_hash != h:
                continue
            klen, dlen = _PAIR.unpack_from(data, rec)
            if klen != len(key):
                continue
            if rec + 8 + klen > size:
                raise struct.error
            if data[rec + 8:rec + 8 + klen] == key:
                if rec + 8 + klen + dlen > size:
                    raise struct.error
                return data[rec + 8 + klen:rec + 8 + klen + dlen]
    except struct.error:
        raise ControlError(path, "CDB corrupt: a read runs past the end of the file") from None
    return None


_cache: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# (key, value bytes) -> Rule: the listener looks up every client, and a rule's decoded strings,
# shared by all the clients it matches, would otherwise be copied into each (~0.4 KB each)
_rules: dict[tuple[str, bytes], Rule] = {}


def _load(path: str) -> bytes:
    """Return the file's bytes, from memory while its identity is unchanged; ControlError otherwise."""
    try:
        st = os.stat(path)
        cached = _cache.get(path)
        if cached is not None and cached[0] == _identity(st):
            return cached[1]
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the listener
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ControlError(path, "not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read()
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ControlError(path, "file does not exist") from None
    except OSError as e:
        raise ControlError(path, e.strerror or str(e)) from None
    if len(data) < _HEADER:
        raise ControlError(path, f"CDB truncated: {len(data)} bytes, the header alone is {_HEADER}")
    _cache.pop(path, None)
    while len(_cache) >= _CACHE_KEEP:
        del _cache[next(iter(_cache))]
    _cache[path] = (_identity(st), data)
    return data


def lookup(path: str, ip: str, host: str | None = None, info: str | None = None) -> Rule | None:
    """Return the first rule of the tcprules CDB `path` whose key matches (order: `keys`).

    None when no key matches, not even the default "": tcpserver then allows
    and sets nothing.  Raises ControlError when the file is missing, unreadable,
    not a regular file or corrupt (tcpserver drops the connection).
    """
    data = _load(path)
    for key in keys(ip, host, info):
        found = _find(data, _raw(key), path)
        if found is not None:
            rule = _rules.get((key, found))
            if rule is None:
                if len(_rules) >= 4096:  # a file with a rule per address: do not grow for ever
                    _rules.clear()
                action, env = parse_value(found)
                rule = _rules[key, found] = Rule(action, key, env)
            return rule
    return None


def apply(env: Mapping[str, str], rule: Rule | None) -> dict[str, str]:
    """Return a new environment: `env` with the rule's variables set (or unset, value None) in order.

    Apply it after PROTO and the TCP* variables, as tcpserver does, so a rule
    may override TCPLOCALHOST or TCPREMOTEHOST.  `rule` None returns a copy.
    Never raises.
    """
    out = dict(env)
    for name, val in rule.env if rule is not None else ():
        if val is None:
            out.pop(name, None)
        else:
            out[name] = val
    return out
