"""Control lists: text and CDB, badheloarg, rcptusers, compile, tarpitctl cdb."""

from __future__ import annotations

import os
import shutil
import signal
import string
import struct
import subprocess
from pathlib import Path

import cdblib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libtarpit.checks import helo, rcpt_accepted as rcpt_valid
from libtarpit.config import DEFAULTS
from libtarpit.control import (
    ControlList,
    compile_cdb,
    parse_text,
    rcpt_candidates,
    stale_cdb,
)
from libtarpit.session import Lists
from conftest import need
from libtarpit.errors import ControlError

# The HELO and RCPT decisions live in libtarpit.checks; these tests read lists through them.
_HELO_LIST_AND_SHAPE = DEFAULTS["normal"]._replace(helo="enforce", helo_nodot="enforce", helo_literal="ignore")


def helo_refused(arg: str, badheloarg) -> str | None:
    """The reason checks.helo refuses `arg` with this list and the shape rule on, or None."""
    verdict = helo(arg, "192.0.2.1", Lists(badheloarg, None), _HELO_LIST_AND_SHAPE)
    return verdict.reason if verdict else None

EXAMPLES = Path(__file__).resolve().parent.parent / "control-examples"
@pytest.fixture
def tinycdb():
    """tinycdb's `cdb` command (skips, or fails under TEST_REQUIRE_ALL, when it is missing)."""
    return need("cdb")


needs_tinycdb = pytest.mark.usefixtures("tinycdb")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, name: str, text: str, cdb: bool) -> ControlList:
    """Write NAME (and NAME.cdb when asked) in tmp_path and load the list."""
    src = write(tmp_path / name, text)
    if cdb:
        compile_cdb(str(src))
        src.unlink()  # prove the CDB alone answers
    lst = ControlList.load(str(tmp_path), name)
    assert lst is not None
    assert lst.format == ("cdb" if cdb else "text")
    return lst


def tinycdb_make(path: Path, keys: list[bytes], value: bytes = b"") -> None:
    records = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(value), k, value) for k in keys) + b"\n"
    subprocess.run(["cdb", "-c", str(path)], input=records, check=True)


def tinycdb_dump(path: Path) -> list[tuple[bytes, bytes]]:
    out = subprocess.run(["cdb", "-d", str(path)], capture_output=True, check=True).stdout
    pairs = []
    for line in out.split(b"\n"):
        if not line:
            continue
        head, rest = line[1:].split(b":", 1)
        klen, dlen = (int(x) for x in head.split(b","))
        pairs.append((rest[:klen], rest[klen + 2:klen + 2 + dlen]))
    return pairs


def tarpitctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["tarpitctl", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --- the text format --------------------------------------------------------

def test_parse_text_comments_blank_lines_case_and_duplicates():
    text = "\ufeff# header\n\nLocalHost\r\n  mail.Example.COM   # our MX\na#b\n\tlocalhost\n"
    assert parse_text(text, "f") == ["localhost", "mail.example.com", "a#b"]


@pytest.mark.parametrize("line, reason", [
    ("two words", "whitespace inside a key"),
    ("tab\there", "whitespace inside a key"),
    ("bell\x07", "control character U+0007"),
    ("del\x7f", "control character U+007F"),
    ("caf\udce9", "not UTF-8"),
])
def test_parse_text_bad_line_names_file_line_and_reason(line, reason):
    with pytest.raises(ControlError) as e:
        parse_text(f"good\n# comment\n{line}\n", "/etc/x")
    assert (e.value.path, e.value.line, e.value.reason) == ("/etc/x", 3, reason)
    assert str(e.value) == f"/etc/x:3: {reason}"


@pytest.mark.parametrize("line, reason", [
    ("a@b@example.com", "more than one '@'"),
    ("user@", "nothing after '@'"),
    ("@", "nothing after '@'"),
    ("<user@example.com>", "write the address without quotes or angle brackets"),
    ('"user"@example.com', "write the address without quotes or angle brackets"),
])
def test_parse_text_rcptusers_rules(line, reason):
    with pytest.raises(ControlError) as e:
        parse_text(line + "\n", "rcptusers", "rcptusers")
    assert (e.value.line, e.value.reason) == (1, reason)


def test_address_rules_apply_to_rcptusers_only():
    assert parse_text("A@b@Example.com\n<x>\n", "somelist") == ["a@b@example.com", "<x>"]


def test_parse_text_kind_normalisation():
    assert parse_text("LocalHost.\n", "b", "badheloarg") == ["localhost"]
    assert parse_text("Bob@Example.COM.\n@Lists.Example.\n", "r", "rcptusers") == ["bob@example.com", "@lists.example"]


def test_non_utf8_is_an_error_in_a_key_but_allowed_in_a_comment(tmp_path):
    (tmp_path / "badheloarg").write_bytes("# \u65e5\u672c\n".encode("euc-jp") + b"localhost\n")
    assert "localhost" in ControlList.load(str(tmp_path), "badheloarg")
    (tmp_path / "badheloarg").write_bytes(b"localhost\nbad\xffname\n")
    with pytest.raises(ControlError) as e:
        ControlList.load(str(tmp_path), "badheloarg")
    assert (e.value.line, e.value.reason) == (2, "not UTF-8")


# --- loading ------------------------------------------------------------------

@pytest.mark.parametrize("cdb", [False, True], ids=["text", "cdb"])
def test_lookup_is_case_insensitive(tmp_path, cdb):
    lst = load(tmp_path, "somelist", "Alpha\nbeta.EXAMPLE\n", cdb)
    assert "alpha" in lst and "ALPHA" in lst and "Beta.Example" in lst
    assert "gamma" not in lst and "" not in lst and "alph" not in lst
    assert len(lst) == 2 and lst.keys() == {"alpha", "beta.example"}


def test_missing_list_is_no_check(tmp_path):
    assert ControlList.load(str(tmp_path), "badheloarg") is None
    assert ControlList.load(str(tmp_path / "no-such-dir"), "rcptusers") is None


def test_cdb_wins_over_text_and_stale_is_reported(tmp_path):
    write(tmp_path / "badheloarg", "old.example\n")
    compile_cdb(str(tmp_path / "badheloarg"))
    write(tmp_path / "badheloarg", "new.example\n")
    os.utime(tmp_path / "badheloarg.cdb", (1, 1))
    lst = ControlList.load(str(tmp_path), "badheloarg")
    assert lst.path == str(tmp_path / "badheloarg.cdb")
    assert "old.example" in lst and "new.example" not in lst
    assert stale_cdb(str(tmp_path), "badheloarg")
    compile_cdb(str(tmp_path / "badheloarg"))
    assert not stale_cdb(str(tmp_path), "badheloarg")
    assert "new.example" in ControlList.load(str(tmp_path), "badheloarg")


def test_text_fallback_path(tmp_path):
    lst = load(tmp_path, "rcptusers", "postmaster\n", cdb=False)
    assert lst.path == str(tmp_path / "rcptusers")


@pytest.mark.parametrize("which", ["badheloarg", "badheloarg.cdb"])
def test_directory_in_place_of_a_list_is_an_error(tmp_path, which):
    (tmp_path / which).mkdir()
    with pytest.raises(ControlError) as e:
        ControlList.load(str(tmp_path), "badheloarg")
    assert e.value.path == str(tmp_path / which) and e.value.reason == "is a directory"


def test_io_error_while_reading_is_an_error_even_as_root(tmp_path):
    # /proc/self/mem opens as a regular file and fails read() at offset 0 with EIO
    (tmp_path / "rcptusers.cdb").symlink_to("/proc/self/mem")
    with pytest.raises(ControlError) as e:
        ControlList.load(str(tmp_path), "rcptusers")
    assert e.value.path == str(tmp_path / "rcptusers.cdb") and e.value.line is None


def test_dangling_symlink_is_an_error_not_a_missing_list(tmp_path):
    (tmp_path / "rcptusers").symlink_to(tmp_path / "gone")
    with pytest.raises(ControlError, match="dangling symbolic link"):
        ControlList.load(str(tmp_path), "rcptusers")


def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "badheloarg.cdb")

    def hung(signum, frame):
        raise AssertionError("ControlList.load blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(ControlError, match="not a regular file"):
            ControlList.load(str(tmp_path), "badheloarg")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- corrupt CDB ----------------------------------------------------------------

def good_cdb(tmp_path: Path, keys: str = "alpha\nbeta\ngamma\n") -> bytes:
    compile_cdb(str(write(tmp_path / "src", keys)), str(tmp_path / "somelist.cdb"))
    return (tmp_path / "somelist.cdb").read_bytes()


@pytest.mark.parametrize("cut", [0, 100, 2047, 2048 + 5, -1, -8])
def test_truncated_cdb_is_corrupt(tmp_path, cut):
    data = good_cdb(tmp_path)
    (tmp_path / "somelist.cdb").write_bytes(data[:cut])
    with pytest.raises(ControlError, match="CDB (truncated|corrupt)"):
        ControlList.load(str(tmp_path), "somelist")


def test_garbage_cdb_is_corrupt(tmp_path):
    (tmp_path / "somelist.cdb").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ControlError, match="CDB corrupt"):
        ControlList.load(str(tmp_path), "somelist")


def test_pointer_past_the_end_is_corrupt(tmp_path):
    data = bytearray(good_cdb(tmp_path))
    data[0:4] = (len(data) + 1000).to_bytes(4, "little")
    (tmp_path / "somelist.cdb").write_bytes(bytes(data))
    with pytest.raises(ControlError, match="hash table 0 lies outside the file"):
        ControlList.load(str(tmp_path), "somelist")


def flipped_alpha(tmp_path: Path) -> None:
    data = bytearray(good_cdb(tmp_path))
    data[2048 + 8] ^= 0x20  # first key "alpha" -> "Alpha": no longer matches its slot hash
    (tmp_path / "somelist.cdb").write_bytes(bytes(data))


def test_flipped_record_byte_is_corrupt_when_verified(tmp_path):
    flipped_alpha(tmp_path)
    cache = tmp_path / "state"
    cache.mkdir()
    with pytest.raises(ControlError, match="CDB corrupt"):
        ControlList.load(str(tmp_path), "somelist", cache_dir=str(cache))
    # remembered: the next connection is refused at once, without the O(n) check
    with pytest.raises(ControlError, match="CDB corrupt"):
        ControlList.load(str(tmp_path), "somelist", cache_dir=str(cache))
    assert (cache / "cdb-verified").read_text().startswith("bad ")


def test_flipped_record_byte_without_a_cache_is_a_miss_and_verify_finds_it(tmp_path):
    flipped_alpha(tmp_path)
    lst = ControlList.load(str(tmp_path), "somelist")  # header check only
    assert "alpha" not in lst and "beta" in lst
    with pytest.raises(ControlError, match="CDB corrupt"):
        lst.verify()


def full_table(tmp_path: Path) -> int:
    """Make every slot of alpha's hash table point at alpha; return the table number."""
    data = bytearray(good_cdb(tmp_path, "alpha\n"))
    tables = [struct.unpack_from("<LL", data, 8 * n) for n in range(256)]
    n, (pos, count) = next((n, t) for n, t in enumerate(tables) if t[1])
    slots = [bytes(data[pos + 8 * s:pos + 8 * s + 8]) for s in range(count)]
    filled = next(slot for slot in slots if slot[4:] != bytes(4))
    data[pos:pos + 8 * count] = filled * count  # every slot taken: a miss would probe forever
    (tmp_path / "somelist.cdb").write_bytes(bytes(data))
    return n


def key_in_table(n: int, but: str = "alpha") -> str:
    return next(k for k in (f"k{i}" for i in range(100000)) if cdblib.djb_hash(k.encode()) & 0xFF == n
                and k != but)


def test_full_hash_table_is_corrupt_not_an_endless_lookup(tmp_path):
    n = full_table(tmp_path)
    cache = tmp_path / "state"
    cache.mkdir()
    with pytest.raises(ControlError, match=f"hash table {n} has no empty slot"):
        ControlList.load(str(tmp_path), "somelist", cache_dir=str(cache))


def test_full_hash_table_without_a_cache_fails_at_lookup_not_forever(tmp_path):
    n = full_table(tmp_path)
    lst = ControlList.load(str(tmp_path), "somelist")
    assert "alpha" in lst
    with pytest.raises(ControlError, match=f"hash table {n} has no empty slot"):
        key_in_table(n) in lst


def damaged(tmp_path: Path, keys: str, patch) -> ControlList:
    data = bytearray(good_cdb(tmp_path, keys))
    patch(data)
    (tmp_path / "somelist.cdb").write_bytes(bytes(data))
    return ControlList.load(str(tmp_path), "somelist")


def slot_of(data: bytearray, key: bytes) -> int:
    """Return the byte offset of the slot that holds `key`."""
    h = cdblib.djb_hash(key)
    pos, count = struct.unpack_from("<LL", data, 8 * (h & 0xFF))
    for i in range(count):
        at = pos + 8 * (((h >> 8) + i) % count)
        if struct.unpack_from("<L", data, at)[0] == h:
            return at
    raise AssertionError("key not found")


@pytest.mark.parametrize("where", ["past the file", "into the tables", "before the records"])
def test_slot_pointing_outside_the_records_is_an_error_at_lookup(tmp_path, where):
    def patch(data):
        at = slot_of(data, b"beta")
        rec = {"past the file": len(data) + 1000, "into the tables": len(data) - 4,
               "before the records": 100}[where]
        struct.pack_into("<L", data, at + 4, rec)

    lst = damaged(tmp_path, "alpha\nbeta\ngamma\n", patch)
    assert "alpha" in lst
    with pytest.raises(ControlError, match="CDB corrupt: hash table .* points outside the records"):
        "beta" in lst


def test_record_length_past_the_end_is_an_error_at_lookup(tmp_path):
    def patch(data):
        struct.pack_into("<L", data, 2048, 0xFFFFFF00)  # alpha's key length

    lst = damaged(tmp_path, "alpha\nbeta\n", patch)
    with pytest.raises(ControlError, match="record at byte 2048 runs past its end"):
        "alpha" in lst
    with pytest.raises(ControlError, match="record at byte 2048 runs past its end"):
        len(lst)


def test_file_truncated_in_place_after_load_is_an_error_not_a_crash(tmp_path):
    good_cdb(tmp_path, "".join(f"user{i}\n" for i in range(200)))
    lst = ControlList.load(str(tmp_path), "somelist")
    assert "user7" in lst
    with open(tmp_path / "somelist.cdb", "r+b") as f:
        f.truncate(2100)  # an admin's `cat > somelist.cdb`: our pread comes back short
    with pytest.raises(ControlError, match="CDB corrupt"):
        any(f"user{i}" in lst for i in range(200))


def test_lookup_reads_the_file_not_a_copy_of_it(tmp_path, monkeypatch):
    good_cdb(tmp_path, "".join(f"user{i}@example.com\n" for i in range(20000)))
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, pos: reads.append(n) or real(fd, n, pos))
    lst = ControlList.load(str(tmp_path), "somelist")
    assert "user19999@example.com" in lst and "nobody@example.com" not in lst
    assert sum(reads) < 4096 and len(reads) < 12


def test_python_hash_matches_cdblib():
    from libtarpit.control import _djb_hash

    for key in [b"", b"a", b"postmaster", bytes(range(256)), "j\u00fcrgen@example.de".encode()]:
        assert _djb_hash(key) == cdblib.djb_hash(key) & 0xFFFFFFFF


# --- verification once per file identity ------------------------------------------

def test_verified_once_per_file_identity(tmp_path, monkeypatch):
    from libtarpit import control

    cache = tmp_path / "state"
    cache.mkdir()
    calls = []
    real = control._Cdb.verify
    monkeypatch.setattr(control._Cdb, "verify", lambda self, kind: calls.append(
        os.path.basename(self.path)) or real(self, kind))
    good_cdb(tmp_path)  # compile checks its temp file in full, without a cache_dir
    assert calls[0].startswith(".somelist.cdb.")
    del calls[:]
    for _ in range(3):
        lst = ControlList.load(str(tmp_path), "somelist", cache_dir=str(cache))
        assert "beta" in lst
    assert calls == ["somelist.cdb"]
    assert len(lst) == 3
    good_cdb(tmp_path, "alpha\nbeta\ngamma\ndelta\n")  # a new file: a new identity
    assert "delta" in ControlList.load(str(tmp_path), "somelist", cache_dir=str(cache))
    assert calls[-2].startswith(".somelist.cdb.") and calls[-1] == "somelist.cdb" and len(calls) == 3
    lines = (cache / "cdb-verified").read_text().splitlines()
    assert len(lines) == 2 and all(x.startswith("ok ") for x in lines)


def test_the_cache_keeps_only_the_newest_verdicts(tmp_path):
    cache = tmp_path / "state"
    cache.mkdir()
    for i in range(40):
        good_cdb(tmp_path, f"key{i}\n")
        ControlList.load(str(tmp_path), "somelist", cache_dir=str(cache))
    assert len((cache / "cdb-verified").read_text().splitlines()) == 16


def test_compile_with_a_cache_dir_records_the_new_file_as_verified(tmp_path, monkeypatch):
    from libtarpit import control

    cache = tmp_path / "state"
    cache.mkdir()
    compile_cdb(str(write(tmp_path / "rcptusers", "bob\n")), cache_dir=str(cache))
    monkeypatch.setattr(control._Cdb, "verify", lambda self, kind: pytest.fail("verified again"))
    assert "bob" in ControlList.load(str(tmp_path), "rcptusers", cache_dir=str(cache))


@pytest.mark.parametrize("cache", ["missing", "a-file"])
def test_unusable_cache_dir_falls_back_to_the_header_check(tmp_path, cache, monkeypatch):
    from libtarpit import control

    flipped_alpha(tmp_path)
    if cache == "a-file":
        (tmp_path / cache).write_text("")
    monkeypatch.setattr(control._Cdb, "verify", lambda self, kind: pytest.fail("full check"))
    lst = ControlList.load(str(tmp_path), "somelist", cache_dir=str(tmp_path / cache))
    assert "beta" in lst


def test_while_another_process_verifies_we_only_check_the_header(tmp_path):
    import fcntl

    flipped_alpha(tmp_path)
    cache = tmp_path / "state"
    cache.mkdir()
    with open(cache / "cdb-verified.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        helper = subprocess.run(
            ["python3", "-c", "import sys; from libtarpit.control import ControlList as C; "
             "l = C.load(sys.argv[1], 'somelist', cache_dir=sys.argv[2]); print('beta' in l)",
             str(tmp_path), str(cache)], capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert helper.stdout == "True\n", helper.stderr
    assert not (cache / "cdb-verified").exists()
    with pytest.raises(ControlError):
        ControlList.load(str(tmp_path), "somelist", cache_dir=str(cache))


# --- tinycdb round trips ----------------------------------------------------------

@needs_tinycdb
def test_our_cdb_dumps_with_tinycdb_to_exactly_our_keys(tmp_path):
    src = write(tmp_path / "rcptusers",
                "Postmaster\nabuse\nbob-default\n@Lists.Example.com\nj\u00fcrgen@example.de\nabuse\n")
    assert compile_cdb(str(src)) == 5
    pairs = tinycdb_dump(tmp_path / "rcptusers.cdb")
    assert pairs == [(k.encode(), b"") for k in
                     ["postmaster", "abuse", "bob-default", "@lists.example.com", "j\u00fcrgen@example.de"]]
    query = subprocess.run(["cdb", "-q", str(tmp_path / "rcptusers.cdb"), "bob-default"], capture_output=True)
    assert query.returncode == 0


@needs_tinycdb
def test_tinycdb_made_cdb_is_read(tmp_path):
    keys = [b"localhost", b"localhost.localdomain", "m\u00fcller.example".encode()]
    keys += [b"host%d.example" % i for i in range(300)]
    tinycdb_make(tmp_path / "badheloarg.cdb", keys, value=b"1")
    lst = ControlList.load(str(tmp_path), "badheloarg")
    assert lst.format == "cdb" and len(lst) == len(keys)
    assert "LOCALHOST" in lst and "M\u00dcLLER.example" in lst and "host299.example" in lst
    assert "host300.example" not in lst
    assert helo_refused("LocalHost.LocalDomain.", lst) == "listed"


@needs_tinycdb
def test_tinycdb_made_cdb_with_upper_case_key_is_refused(tmp_path):
    tinycdb_make(tmp_path / "badheloarg.cdb", [b"localhost", b"Mail.Example.com"])
    (tmp_path / "state").mkdir()
    with pytest.raises(ControlError, match="not a normalised badheloarg key"):
        ControlList.load(str(tmp_path), "badheloarg", cache_dir=str(tmp_path / "state"))
    lst = ControlList.load(str(tmp_path), "badheloarg")  # header check only: the key just never matches
    assert "mail.example.com" not in lst
    with pytest.raises(ControlError, match="not a normalised badheloarg key"):
        lst.verify()


@needs_tinycdb
def test_empty_list_compiles_to_an_empty_cdb(tmp_path):
    assert compile_cdb(str(write(tmp_path / "badheloarg", "# nothing yet\n"))) == 0
    assert tinycdb_dump(tmp_path / "badheloarg.cdb") == []
    lst = ControlList.load(str(tmp_path), "badheloarg")
    assert len(lst) == 0 and "localhost" not in lst


_KEY_CHARS = st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
                           blacklist_characters="#@\"<>\ufeff")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.text(_KEY_CHARS, min_size=1, max_size=20), max_size=30),
       domains=st.lists(st.sampled_from(["Example.COM", "example.org", "lists.example.net"]), max_size=3))
def test_compile_then_load_gives_back_the_normalised_keys(tmp_path, keys, domains):
    keys = [k for k in keys if k.strip(".") != ""] + [f"@{d}" for d in domains]
    src = tmp_path / "rcptusers"
    src.write_text("\n".join(f"{k}   # comment" if i % 2 else k for i, k in enumerate(keys)) + "\n", encoding="utf-8")
    expected = parse_text(src.read_text(encoding="utf-8"), str(src), "rcptusers")
    assert set(expected) == {k.lower().removesuffix(".") if k.startswith("@") else k.lower() for k in keys}
    assert compile_cdb(str(src)) == len(expected)
    lst = ControlList.load(str(tmp_path), "rcptusers")
    assert lst.keys() == set(expected)
    ascii_upper = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
    assert all(k in lst and k.translate(ascii_upper) in lst for k in expected)


# --- compile: atomic ----------------------------------------------------------------

def test_compile_bad_line_leaves_old_cdb_and_no_temp_file(tmp_path):
    src = write(tmp_path / "rcptusers", "postmaster\nabuse\n")
    compile_cdb(str(src))
    before = (tmp_path / "rcptusers.cdb").read_bytes()
    write(src, "postmaster\nabuse\nbroken user\n")
    with pytest.raises(ControlError) as e:
        compile_cdb(str(src))
    assert str(e.value) == f"{src}:3: whitespace inside a key"
    assert (tmp_path / "rcptusers.cdb").read_bytes() == before
    assert files_in(tmp_path) == {"rcptusers", "rcptusers.cdb"}


def test_compile_keeps_mode_and_leaves_only_the_cdb(tmp_path):
    src = write(tmp_path / "badheloarg", "localhost\n")
    compile_cdb(str(src))
    assert (tmp_path / "badheloarg.cdb").stat().st_mode & 0o777 == 0o644
    os.chmod(tmp_path / "badheloarg.cdb", 0o640)
    write(src, "localhost\nmx.example.com\n")
    assert compile_cdb(str(src)) == 2
    assert (tmp_path / "badheloarg.cdb").stat().st_mode & 0o777 == 0o640
    assert files_in(tmp_path) == {"badheloarg", "badheloarg.cdb"}


def test_compile_replaces_by_rename_so_an_open_reader_keeps_the_old_file(tmp_path):
    src = write(tmp_path / "badheloarg", "old.example\n")
    compile_cdb(str(src))
    with open(tmp_path / "badheloarg.cdb", "rb") as held:
        write(src, "new.example\n")
        compile_cdb(str(src))
        assert ControlList.from_cdb_bytes(held.read(), "held", "badheloarg").keys() == {"old.example"}
    assert ControlList.load(str(tmp_path), "badheloarg").keys() == {"new.example"}


def test_compile_to_missing_directory_is_an_io_error(tmp_path):
    src = write(tmp_path / "badheloarg", "localhost\n")
    with pytest.raises(ControlError) as e:
        compile_cdb(str(src), str(tmp_path / "nodir" / "x.cdb"))
    assert e.value.line is None


def test_compile_refuses_to_overwrite_its_source(tmp_path):
    src = write(tmp_path / "badheloarg", "localhost\n")
    with pytest.raises(ValueError):
        compile_cdb(str(src), str(src))
    assert src.read_text() == "localhost\n"


# --- badheloarg -----------------------------------------------------------------------

@pytest.mark.parametrize("cdb", [False, True], ids=["text", "cdb"])
@pytest.mark.parametrize("arg, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("localhost", "listed"),
    ("LocalHost", "listed"),
    ("localhost.", "listed"),
    ("LOCALHOST.LOCALDOMAIN", "listed"),
    ("mx.example.com", "listed"),
    ("MX.Example.Com.", "listed"),
    ("[192.0.2.25]", "listed"),
    ("foo", "nodot"),
    ("foo.", "nodot"),
    (".", "nodot"),
    ("[foo]", "nodot"),
    ("[IPv6:bogus]", "nodot"),
    ("mail.example.net", None),
    ("mail.example.net.", None),
    ("  mail.example.net  ", None),
    ("[192.0.2.1]", None),
    ("[IPv6:2001:db8::1]", None),
    ("[ipv6:::1]", None),
])
def test_helo_refused(tmp_path, cdb, arg, reason):
    lst = load(tmp_path, "badheloarg", "localhost\nlocalhost.localdomain\nMX.example.com.\n[192.0.2.25]\n", cdb)
    assert helo_refused(arg, lst) == reason


@pytest.mark.parametrize("arg, reason", [
    ("", "empty"), ("localhost", "nodot"), ("localhost.localdomain", None), ("[IPv6:::1]", None), ("[::1]", "nodot"),
])
def test_helo_refused_without_a_list_still_checks_empty_and_nodot(arg, reason):
    assert helo_refused(arg, None) == reason


def test_shipped_badheloarg_example(tmp_path):
    shutil.copy(EXAMPLES / "badheloarg", tmp_path / "badheloarg")
    lst = ControlList.load(str(tmp_path), "badheloarg")
    assert lst.keys() == {"localhost", "localhost.localdomain"}
    assert helo_refused("localhost.localdomain", lst) == "listed"


# --- rcptusers --------------------------------------------------------------------------

RCPTUSERS = """\
Postmaster
bob@Example.COM
@lists.example.org
alice-ml-default
carol-default@example.com
dave-x-default
"""


@pytest.mark.parametrize("cdb", [False, True], ids=["text", "cdb"])
@pytest.mark.parametrize("address, valid", [
    ("postmaster", True),                       # local, no domain
    ("POSTMASTER@any.example", True),           # local at any domain, case
    ("Bob@example.com", True),                  # local@domain
    ("bob@example.org", False),                 # bob only at example.com
    ("bob", False),
    ("anyone@Lists.Example.Org", True),         # @domain
    ("anyone@lists.example.org.", True),        # trailing dot on the domain
    ("anyone@example.org", False),
    ("alice-ml-default", True),
    ("alice-ml-foo", True),                     # a-b-c -> a-b-default
    ("alice-ml-foo-bar@example.net", True),     # a-b-c-d -> a-b-default (two steps)
    ("alice-foo", False),                       # alice-default is not listed
    ("alice-ml", False),                        # no fallback to itself
    ("carol-x@example.com", True),              # a-b -> a-default@domain
    ("carol-x-y@EXAMPLE.com", True),            # a-b-c -> a-b-default (miss) -> a-default@domain
    ("carol-x@example.net", False),             # carol-default only at example.com
    ("dave-x-y-z", True),                       # a-b-c-d -> a-b-c-default (miss) -> a-b-default
    ("dave-y-z", False),
    ('"Postmaster"@example.com', True),         # quoted local part
    ('"bob"@example.com', True),
    ('"a@b"@lists.example.org', True),          # @domain still applies
    ('"a@b"@example.com', False),
    ('"no body"@example.com', False),
    ("", False),                                # the null path <>
    ("<>", False),
])
def test_rcpt_valid(tmp_path, cdb, address, valid):
    lst = load(tmp_path, "rcptusers", RCPTUSERS, cdb)
    assert rcpt_valid(address, lst) is valid


def test_rcpt_candidates_order_of_the_default_fallback():
    assert rcpt_candidates("A-B-C@Example.COM") == [
        "a-b-c@example.com", "a-b-c", "@example.com",
        "a-b-default@example.com", "a-b-default", "a-default@example.com", "a-default",
    ]
    assert rcpt_candidates("a-b-c") == ["a-b-c", "a-b-default", "a-default"]
    assert rcpt_candidates("@relay.example:user@example.com")[:2] == ["user@example.com", "user"]
    assert rcpt_candidates("") == []


@pytest.mark.parametrize("listed, address, valid", [
    ("a-b-default", "a-b-c", True),
    ("a-default", "a-b-c", True),
    ("a-b-c-default", "a-b-c", False),
    ("a-b-default@example.com", "a-b-c@example.com", True),
    ("a-default@example.com", "a-b-c@example.com", True),
    ("a-default@example.com", "a-b-c@example.org", False),
    ("a-default", "a", False),
    ("a-default", "a-", True),
])
def test_rcpt_each_fallback_step(tmp_path, listed, address, valid):
    lst = load(tmp_path, "rcptusers", listed + "\n", cdb=True)
    assert rcpt_valid(address, lst) is valid


def test_rcpt_without_a_list_accepts_everyone_but_the_null_path():
    assert rcpt_valid("anyone@example.com", None)
    assert rcpt_valid("x", None)
    assert not rcpt_valid("", None)


def test_shipped_rcptusers_example(tmp_path):
    shutil.copy(EXAMPLES / "rcptusers", tmp_path / "rcptusers")
    lst = ControlList.load(str(tmp_path), "rcptusers")
    assert lst.keys() == {"postmaster", "abuse"}
    assert rcpt_valid("Abuse@example.com", lst) and not rcpt_valid("bob@example.com", lst)


# --- tarpitctl cdb ------------------------------------------------------------------------

def test_cli_compiles_and_prints_a_summary(tmp_path):
    write(tmp_path / "rcptusers", "postmaster\nabuse\nabuse\n")
    r = tarpitctl("cdb", "rcptusers", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "rcptusers -> rcptusers.cdb: 2 keys\n", "")
    assert ControlList.load(str(tmp_path), "rcptusers").keys() == {"postmaster", "abuse"}


def test_cli_output_option(tmp_path):
    src = write(tmp_path / "rcptusers.new", "a@b.example\n")
    out = tmp_path / "elsewhere.cdb"
    r = tarpitctl("cdb", str(src), "-o", str(out))
    assert (r.returncode, r.stdout) == (0, f"{src} -> {out}: 1 keys\n")
    assert ControlList.from_cdb_bytes(out.read_bytes(), str(out), "rcptusers").keys() == {"a@b.example"}


def test_cli_parse_error_exits_100_and_keeps_old_cdb(tmp_path):
    src = write(tmp_path / "rcptusers", "postmaster\n")
    assert tarpitctl("cdb", str(src)).returncode == 0
    before = (tmp_path / "rcptusers.cdb").read_bytes()
    write(src, "postmaster\n\n# fine\na@b@c\n")
    r = tarpitctl("cdb", str(src))
    assert (r.returncode, r.stdout) == (100, "")
    assert r.stderr == f"tarpitctl: {src}:4: more than one '@'\n"
    assert (tmp_path / "rcptusers.cdb").read_bytes() == before
    assert files_in(tmp_path) == {"rcptusers", "rcptusers.cdb"}


def test_cli_kind_option_overrides_the_file_name(tmp_path):
    src = write(tmp_path / "list.txt", "a@b@c\n")
    assert tarpitctl("cdb", str(src)).returncode == 0
    r = tarpitctl("cdb", str(src), "--kind", "rcptusers")
    assert r.returncode == 100 and ":1: more than one '@'" in r.stderr


def test_cli_io_errors_exit_111(tmp_path):
    r = tarpitctl("cdb", str(tmp_path / "missing"))
    assert r.returncode == 111 and r.stderr.startswith(f"tarpitctl: {tmp_path / 'missing'}: ")
    (tmp_path / "adir").mkdir()
    assert tarpitctl("cdb", str(tmp_path / "adir")).returncode == 111
    src = write(tmp_path / "badheloarg", "localhost\n")
    r = tarpitctl("cdb", str(src), "-o", str(tmp_path / "nodir" / "out.cdb"))
    assert r.returncode == 111 and "Traceback" not in r.stderr


def test_cli_usage_errors_exit_100(tmp_path):
    assert tarpitctl("cdb").returncode == 100
    src = write(tmp_path / "badheloarg", "localhost\n")
    r = tarpitctl("cdb", str(src), "-o", str(src))
    assert r.returncode == 100 and src.read_text() == "localhost\n"


def test_postmaster_is_always_a_valid_recipient(tmp_path):
    (tmp_path / "rcptusers").write_text("bob\n")
    lst = ControlList.load(str(tmp_path), "rcptusers")
    assert rcpt_valid("PostMaster@example.com", lst)
    assert rcpt_valid("postmaster", lst)
    assert not rcpt_valid("postmaster-x@example.com", lst)


def test_tarpitctl_cdb_records_the_cdb_in_the_state_dir(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    write(tmp_path / "rcptusers", "bob\n")
    done = tarpitctl("cdb", "--state-dir", str(state), str(tmp_path / "rcptusers"))
    assert done.returncode == 0, done.stderr
    st = (tmp_path / "rcptusers.cdb").stat()
    assert (state / "cdb-verified").read_text() == \
        f"ok {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} rcptusers\n"
    env = dict(os.environ, TARPIT_STATE_DIR=str(state), TARPIT_CONTROL=str(tmp_path))
    write(tmp_path / "rcptusers", "bob\nalice\n")
    done = subprocess.run(["tarpitctl", "cdb", str(tmp_path / "rcptusers")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len((state / "cdb-verified").read_text().splitlines()) == 2
    # no state dir at all: the compile still works
    done = tarpitctl("cdb", "--state-dir", str(tmp_path / "missing"), str(tmp_path / "rcptusers"))
    assert done.returncode == 0, done.stderr
