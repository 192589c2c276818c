"""tarpitctl stats against seed 000's measured tables and hand-made logs.

The expected numbers below are typed in from seed 000 (environments A and B),
not computed by the code under test; blank PL cells in the seed are 0 here.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from libtarpit.log import format_line
from libtarpit.stats import parse_tai64n

# (seconds, LC, PL, %) as printed in seed 000.
SEED_A_ROWS = [
    (0, 62, 82, 7), (10, 131, 1, 6), (20, 310, 4, 15), (30, 805, 101, 43),
    (40, 201, 0, 9), (50, 57, 2, 3), (60, 84, 98, 9), (70, 1, 0, 0),
    (80, 3, 2, 0), (90, 180, 0, 8),
]
SEED_A_TOTAL = 2124
SEED_A_CUMULATIVE = [(35, 1496, 70), (45, 1697, 80), (65, 1938, 91)]

SEED_B_ROWS = [
    (0, 234, 655, 4), (10, 7737, 369, 37), (20, 2185, 68, 10), (30, 5663, 392, 27),
    (40, 113, 9, 1), (50, 708, 32, 3), (60, 1131, 1705, 13), (70, 46, 14, 0),
    (80, 36, 5, 0), (90, 928, 102, 5),
]
SEED_B_TOTAL = 22132
SEED_B_CUMULATIVE = [(35, 17303, 78), (45, 17425, 79), (65, 21001, 95)]

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%$")
TOTAL = re.compile(r"^total\s+(\d+)$")
CUMULATIVE = re.compile(r"^up to (\d+) s\s+(\d+)\s+(\d+)%$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def line(conn: int, event: str, cls: str = "suspicious", *, ip: str = "192.0.2.7",
         **extra: object) -> str:
    rule = 1 if cls == "suspicious" else "-"
    pairs = [("conn", f"c{conn}"), ("pid", 1000 + conn), ("ip", ip),
             ("host", "p1-2-3.dyn.example"), ("class", cls), ("rule", rule),
             ("event", event), *extra.items()]
    return format_line(pairs)


def elapsed_in_bucket(bucket: int, i: int) -> float:
    """Spread clients over the bucket's whole range: [b-5, b+5), bucket 0 is [0, 5)."""
    if bucket == 0:
        return (i % 50) / 10
    return bucket - 5 + (i % 100) / 10


def seed_log(rows: list[tuple[int, int, int, int]]) -> list[str]:
    out: list[str] = []
    conn = 0
    for bucket, lc, pl, _ in rows:
        for kind, count in (("lc", lc), ("pl", pl)):
            for i in range(count):
                conn += 1
                s = elapsed_in_bucket(bucket, i)
                out.append(line(conn, "connect"))
                out.append(line(conn, "tarpit_start", stage="rcpt", seconds=65))
                if kind == "lc":
                    out.append(line(conn, "tarpit_lost", stage="rcpt", elapsed=s))
                    continue
                out.append(line(conn, "pipelining", stage="rcpt", elapsed=s, bytes=6))
                if i % 2:
                    # The pipeliner then hangs up: still one PL, never also an LC.
                    out.append(line(conn, "tarpit_lost", stage="rcpt", elapsed=s + 20.0))
    return out


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(l + "\n" for l in lines))
    return path


def tarpitctl(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["tarpitctl", "stats", *map(str, args)], input=stdin,
                          capture_output=True, timeout=120)


def parse_output(stdout: bytes) -> tuple[list[tuple[int, ...]], int | None, list[tuple[int, ...]]]:
    rows, total, cumulative = [], None, []
    for text in stdout.decode().splitlines():
        if m := ROW.match(text):
            rows.append(tuple(int(g) for g in m.groups()))
        elif m := TOTAL.match(text):
            total = int(m.group(1))
        elif m := CUMULATIVE.match(text):
            cumulative.append(tuple(int(g) for g in m.groups()))
    return rows, total, cumulative


def funnel_lines(stdout: bytes) -> dict[str, int]:
    out = {}
    for text in stdout.decode().splitlines():
        if m := re.match(r"^\s*(connections|suspicious \(S25R\)|lost in tarpit|greylisted|passed)"
                         r"\s+(\d+)\s+\d+%$", text):
            out[m.group(1)] = int(m.group(2))
    return out


def tai64n(unix: float) -> str:
    return "@%016x%08x" % ((1 << 62) + 10 + int(unix), 0)


@pytest.mark.parametrize("rows,total,cumulative", [
    (SEED_A_ROWS, SEED_A_TOTAL, SEED_A_CUMULATIVE),
    (SEED_B_ROWS, SEED_B_TOTAL, SEED_B_CUMULATIVE),
], ids=["environment-A", "environment-B"])
def test_seed_000_tables_are_reproduced(tmp_path, rows, total, cumulative):
    log = write(tmp_path / "current", seed_log(rows))
    done = tarpitctl(log)
    assert done.returncode == 0, done.stderr
    got_rows, got_total, got_cumulative = parse_output(done.stdout)
    assert got_rows == rows
    assert got_total == total
    assert got_cumulative == cumulative


def test_json_carries_the_same_table(tmp_path):
    log = write(tmp_path / "log", seed_log(SEED_A_ROWS))
    done = tarpitctl("--json", log)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    giveup = data["giveup"]
    assert [(r["seconds"], r["lc"], r["pl"], r["percent"]) for r in giveup["rows"]] == SEED_A_ROWS
    assert giveup["total"] == SEED_A_TOTAL
    assert [(c["up_to"], c["count"], c["percent"]) for c in giveup["cumulative"]] \
        == SEED_A_CUMULATIVE
    assert data["funnel"]["connections"] == SEED_A_TOTAL


def test_gzip_input_reads_like_plain(tmp_path):
    path = tmp_path / "tarpit.log.1.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(l + "\n" for l in seed_log(SEED_A_ROWS)))
    rows, total, cumulative = parse_output(tarpitctl(path).stdout)
    assert (rows, total, cumulative) == (SEED_A_ROWS, SEED_A_TOTAL, SEED_A_CUMULATIVE)


def test_multilog_directory_with_since(tmp_path):
    logdir = tmp_path / "log"
    logdir.mkdir()
    now = time.time()
    old, recent = now - 10 * 86400, now - 3600
    # Rotated file: an old loss (filtered out) and a recent one.
    write(logdir / "@400000006500000000000000.s", [
        tai64n(old) + " " + line(1, "tarpit_lost", stage="rcpt", elapsed=12.0),
        tai64n(recent) + " " + line(2, "tarpit_lost", stage="rcpt", elapsed=31.0),
    ])
    write(logdir / "current", [
        tai64n(recent) + " " + line(3, "pipelining", stage="rcpt", elapsed=3.0, bytes=6),
        line(4, "tarpit_lost", stage="rcpt", elapsed=61.0),  # no stamp: kept
    ])
    done = tarpitctl("--since", "7d", logdir)
    assert done.returncode == 0, done.stderr
    rows, total, _ = parse_output(done.stdout)
    assert total == 3
    assert (0, 0, 1, 33) in rows and (30, 1, 0, 33) in rows and (60, 1, 0, 33) in rows
    assert (10, 0, 0, 0) in rows
    assert "1 lines had no time" in done.stderr.decode()

    everything = parse_output(tarpitctl(logdir).stdout)[1]
    assert everything == 4


@pytest.mark.parametrize("since", ["2000-01-01", "2000-01-01 12:00"])
def test_since_absolute_dates_and_journal_iso_stamps(tmp_path, since):
    log = write(tmp_path / "journal.txt", [
        "1999-12-31T23:00:00+0000 mx tarpit-smtpd[5]: "
        + line(1, "tarpit_lost", stage="rcpt", elapsed=8.0),
        "2026-11-01T12:00:00+0100 mx tarpit-smtpd[6]: "
        + line(2, "tarpit_lost", stage="rcpt", elapsed=22.0),
    ])
    rows, total, _ = parse_output(tarpitctl("--since", since, log).stdout)
    assert total == 1
    assert rows[-1] == (20, 1, 0, 100)


def test_bad_since_is_a_usage_error(tmp_path):
    log = write(tmp_path / "log", [line(1, "connect")])
    done = tarpitctl("--since", "last tuesday", log)
    assert done.returncode == 100
    assert b"--since" in done.stderr


def test_png_is_drawn(tmp_path):
    log = write(tmp_path / "log", seed_log(SEED_A_ROWS))
    png = tmp_path / "giveup.png"
    done = tarpitctl("--png", png, log)
    assert done.returncode == 0, done.stderr
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000


def test_png_without_matplotlib_says_how_to_install(tmp_path):
    # A package named matplotlib that fails to import stands in for "not installed".
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    log = write(tmp_path / "log", [line(1, "connect")])
    done = subprocess.run(["tarpitctl", "stats", "--png", str(tmp_path / "x.png"), str(log)],
                          capture_output=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(fake.parent)})
    assert done.returncode == 100
    assert "install matplotlib (pip install tarpit-smtpd[plot])" in done.stderr.decode()
    assert not (tmp_path / "x.png").exists()


FUNNEL_LOG = [
    # 1: normal client, delivered.
    line(1, "connect", "normal"), line(1, "end", "normal", reason="quit", duration=2.0),
    # 2: suspicious, lost in the tarpit.
    line(2, "connect"), line(2, "tarpit_start", stage="rcpt", seconds=65),
    line(2, "tarpit_lost", stage="rcpt", elapsed=9.5),
    # 3: suspicious, greylisted twice on its retry.
    line(3, "connect"), line(3, "greylist_defer", reason="tarpit_lost", retry_after=1200),
    line(3, "greylist_defer", reason="tarpit_lost", retry_after=600),
    # 4: suspicious, sat through the tarpit and passed.
    line(4, "connect"), line(4, "tarpit_start", stage="rcpt", seconds=65),
    line(4, "tarpit_done", stage="rcpt", elapsed=65.0),
    # 5: suspicious, passed the greylist.
    line(5, "connect"), line(5, "greylist_pass", reason="retried"),
    # 6: suspicious, sat through the tarpit, then refused at RCPT: not passed.
    line(6, "connect"), line(6, "tarpit_done", stage="rcpt", elapsed=65.0),
    line(6, "rcpt_reject", rcpt="nobody@example.org", reason="unknown_user"),
    # 7: normal, bad HELO.
    line(7, "connect", "normal"), line(7, "helo_reject", "normal", helo="foo", reason="nodot"),
    # 8: suspicious, talked first.
    line(8, "connect"), line(8, "pregreet", elapsed=0.3),
]


def test_funnel_on_a_small_log(tmp_path):
    done = tarpitctl(write(tmp_path / "log", FUNNEL_LOG))
    assert done.returncode == 0, done.stderr
    assert funnel_lines(done.stdout) == {
        "connections": 8, "suspicious (S25R)": 6, "lost in tarpit": 1,
        "greylisted": 1, "passed": 2,
    }
    text = done.stdout.decode()
    assert re.search(r"greylist_defer\s+tarpit_lost\s+2$", text, re.M)
    assert re.search(r"rcpt_reject\s+unknown_user\s+1$", text, re.M)
    assert re.search(r"helo_reject\s+nodot\s+1$", text, re.M)
    assert re.search(r"pregreet\s+pregreet\s+1$", text, re.M)


def test_warn_lines_are_would_not_lc_or_pl(tmp_path):
    log = write(tmp_path / "log", [
        line(1, "tarpit_start", stage="rcpt", seconds=65, mode="warn"),
        line(1, "tarpit_lost", stage="rcpt", elapsed=4.0, mode="warn"),
        line(2, "pipelining", stage="rcpt", elapsed=2.0, bytes=6, mode="warn"),
        line(3, "helo_reject", "normal", helo="foo", reason="nodot", mode="warn"),
        line(4, "helo_reject", "normal", helo="bar", reason="nodot", mode="warn"),
        line(5, "tarpit_lost", stage="rcpt", elapsed=14.0),
    ])
    done = tarpitctl(log)
    rows, total, _ = parse_output(done.stdout)
    assert total == 1
    assert rows == [(0, 0, 0, 0), (10, 1, 0, 100)]
    text = done.stdout.decode()
    assert re.search(r"would tarpit\s+1$", text, re.M)
    assert re.search(r"would refuse HELO\s+2$", text, re.M)
    assert re.search(r"would refuse pipelining\s+1$", text, re.M)
    assert not re.search(r"^\s*helo_reject", text, re.M)  # not among enforced reasons
    assert funnel_lines(done.stdout)["lost in tarpit"] == 1


def test_lines_that_are_not_ours_are_ignored(tmp_path):
    log = write(tmp_path / "maillog", [
        "Nov  1 12:00:00 mx postfix/smtpd[1]: lost connection after RCPT from x[1.2.3.4]",
        "@400000006500000000000000 qmail-smtpd: event=tarpit_lost elapsed=3",
        "tarpit-smtpd-other conn=9 event=tarpit_lost elapsed=3",
        line(1, "tarpit_lost", stage="rcpt", elapsed=25.0),
    ])
    rows, total, _ = parse_output(tarpitctl(log).stdout)
    assert total == 1
    assert rows[-1] == (30, 1, 0, 100)


def test_garbage_file_gives_empty_table(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 200 + b"\x1f\x8bnot gzip\n\x00\xff")
    fake_gz = tmp_path / "broken.gz"
    fake_gz.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    done = tarpitctl(junk, fake_gz)
    assert done.returncode == 0
    rows, total, cumulative = parse_output(done.stdout)
    assert rows == [] and total == 0
    assert cumulative == [(35, 0, 0), (45, 0, 0), (65, 0, 0)]
    assert b"no tarpit-smtpd lines found" in done.stderr
    assert b"Traceback" not in done.stderr


def test_stdin_and_missing_file(tmp_path):
    data = "".join(l + "\n" for l in seed_log(SEED_B_ROWS[:2])).encode()
    rows, total, _ = parse_output(tarpitctl("-", stdin=data).stdout)
    assert rows == [(0, 234, 655, 10), (10, 7737, 369, 90)]
    assert total == 8995
    missing = tarpitctl(tmp_path / "nope.log")
    assert missing.returncode == 100
    assert b"nope.log" in missing.stderr


def test_bucket_width_option(tmp_path):
    log = write(tmp_path / "log", [line(i, "tarpit_lost", stage="rcpt", elapsed=s)
                                   for i, s in enumerate([1.0, 2.4, 2.5, 7.0, 33.0])])
    rows, total, cumulative = parse_output(tarpitctl("--bucket", "5", log).stdout)
    assert rows[:2] == [(0, 2, 0, 40), (5, 2, 0, 40)]
    assert total == 5 and cumulative[0] == (35, 5, 100)
    assert tarpitctl("--bucket", "0", log).returncode == 100


def test_tai64n_label():
    assert parse_tai64n("@400000000000000a00000000") == 0.0
    assert parse_tai64n("400000006553f1000000000a") == pytest.approx(0x6553F100 - 10, abs=1e-6)
    with pytest.raises(ValueError):
        parse_tai64n("@4000zz")


def test_pipelining_logged_in_its_default_warn_mode_counts_as_pl():
    from libtarpit.log import parse_line
    from libtarpit.stats import giveup_table

    lines = [
        "tarpit-smtpd conn=a pid=1 event=tarpit_start stage=rcpt seconds=65",
        "tarpit-smtpd conn=a pid=1 event=pipelining mode=warn stage=rcpt elapsed=12.0 bytes=6",
        "tarpit-smtpd conn=a pid=1 event=tarpit_lost stage=rcpt elapsed=30.0",
        "tarpit-smtpd conn=b pid=2 event=tarpit_lost mode=warn stage=rcpt elapsed=3.0",
    ]
    table = giveup_table([parse_line(x) for x in lines])
    assert table.total == 1
    assert [(r.bucket, r.lc, r.pl) for r in table.rows] == [(0, 0, 0), (10, 0, 1)]


# --- forged and absurd lines (a client's MAIL FROM reaches the log via the backend) ---------

def test_forged_lines_in_backend_output_are_not_counted(tmp_path):
    forged = "x tarpit-smtpd conn=1 pid=1 class=suspicious event=tarpit_lost stage=rcpt elapsed=3"
    log = write(tmp_path / "current", [
        *(f"{tai64n(1.7e9)} tarpit-sink: from=<{forged.replace('conn=1', f'conn={i}')}>" for i in range(5)),
        f"Nov 26 12:00:00 mx tcpserver[9]: tarpit-sink: from=<{forged}>",
        f"2026-11-26T12:00:00+0100 mx tcpserver[9]: qmail-smtpd: <{forged}>",
        tai64n(1.7e9) + " " + line(1, "tarpit_lost", stage="rcpt", elapsed=25.0),
    ])
    done = tarpitctl(log)
    assert done.returncode == 0, done.stderr
    rows, total, _ = parse_output(done.stdout)
    assert total == 1 and rows[-1] == (30, 1, 0, 100)
    assert funnel_lines(done.stdout) == {"connections": 1, "suspicious (S25R)": 1,
                                         "lost in tarpit": 1, "greylisted": 0, "passed": 0}


@pytest.mark.parametrize("prefix", [
    "", "@400000006553f1000000000a ", "2026-11-26T12:00:00+0100 mx tarpit-smtpd[5]: ",
    "2026-11-26 12:00:00.123456789  ", "Nov 26 12:00:00 mx tcpserver[5]: ", "Nov 26 12:00:00 ",
])
def test_each_collector_prefix_is_read(tmp_path, prefix):
    log = write(tmp_path / "log", [prefix + line(1, "tarpit_lost", stage="rcpt", elapsed=14.0)])
    rows, total, _ = parse_output(tarpitctl(log).stdout)
    assert total == 1 and rows == [(0, 0, 0, 0), (10, 1, 0, 100)]


def test_absurd_elapsed_values_finish_quickly_and_are_left_out(tmp_path):
    bad = ["1e8", "nan", "inf", "-inf", "-5", "86401", "1e308", "0x10"]
    lines = [f"tarpit-smtpd conn=b{i} pid={i} class=suspicious event=tarpit_lost stage=rcpt elapsed={v}"
             for i, v in enumerate(bad)]
    lines.append(line(99, "tarpit_lost", stage="rcpt", elapsed=31.0))
    log = write(tmp_path / "log", lines)
    started = time.monotonic()
    done = tarpitctl(log)
    assert time.monotonic() - started < 20
    assert done.returncode == 0, done.stderr
    rows, total, _ = parse_output(done.stdout)
    assert total == 1 and rows == [(0, 0, 0, 0), (10, 0, 0, 0), (20, 0, 0, 0), (30, 1, 0, 100)]
    assert f"left out: {len(bad)} lines whose elapsed was not a number in 0..86400 s" \
        in done.stdout.decode()
    data = json.loads(tarpitctl("--json", log).stdout)
    assert data["giveup"]["skipped"] == len(bad) and data["giveup"]["total"] == 1


def test_a_long_run_of_empty_buckets_is_one_ellipsis_line(tmp_path):
    log = write(tmp_path / "log", [line(1, "tarpit_lost", stage="rcpt", elapsed=12.0),
                                   line(2, "tarpit_lost", stage="rcpt", elapsed=86000.0),
                                   line(3, "tarpit_lost", stage="rcpt", elapsed=86400.0)])
    done = tarpitctl("--bucket", "1", log)
    assert done.returncode == 0, done.stderr
    rows, total, _ = parse_output(done.stdout)
    assert total == 3
    assert rows == [(12, 1, 0, 33), (86000, 1, 0, 33), (86400, 1, 0, 33)]
    text = done.stdout.decode()
    assert text.count("    ...\n") == 3  # before 12 (12 empty buckets), and twice more


def test_gap_rule_keeps_short_runs_of_empty_buckets():
    from libtarpit.stats import GAP_ROWS, giveup_table

    def table(*elapsed):
        events = [{"conn": str(i), "event": "tarpit_lost", "elapsed": str(s)} for i, s in enumerate(elapsed)]
        return [r.bucket for r in giveup_table(events).rows]

    assert table(10 * GAP_ROWS) == list(range(0, 10 * GAP_ROWS + 1, 10))  # GAP_ROWS empty: kept
    assert table(10 * (GAP_ROWS + 1)) == [10 * (GAP_ROWS + 1)]             # one more: left out
    assert table(0, 10 * (GAP_ROWS + 2)) == [0, 10 * (GAP_ROWS + 2)]       # between two present
    assert table() == []


def test_client_text_in_reasons_is_printed_escaped(tmp_path):
    log = write(tmp_path / "log", [
        'tarpit-smtpd conn=1 pid=1 event=rcpt_reject reason="\x1b]0;pwned\x07' + "x" * 100 + '"',
    ])
    done = tarpitctl(log)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "\x1b" not in text and "\x07" not in text
    assert re.search(r"rcpt_reject\s+\?\]0;pwned\?x+\.\.\.\s+1$", text, re.M)


# --- TLS share, AUTH failures per network, error lines (issues 11 and 13) ---------------

TLS_LOG = [
    # 1: terminated by the wrapper, then authenticated.
    line(1, "connect", "normal", ip="192.0.2.121"),
    line(1, "tls", "normal", ip="192.0.2.121", detail="TLSv1.3 TLS_AES_256_GCM_SHA384"),
    line(1, "auth", "normal", ip="192.0.2.121", mech="PLAIN", result="ok"),
    line(1, "end", "normal", ip="192.0.2.121", reason="backend_closed", duration=2.3, tls=1, auth=1),
    # 2: passed through after a tarpit at STARTTLS.
    line(2, "connect", ip="198.51.100.9"),
    line(2, "tarpit_start", ip="198.51.100.9", stage="tls", seconds=65.0),
    line(2, "tarpit_done", ip="198.51.100.9", stage="tls", elapsed=65.0),
    line(2, "tls_passthrough", ip="198.51.100.9"),
    line(2, "end", ip="198.51.100.9", reason="client_closed", duration=70.4, tls=1),
    # 3: plaintext all the way.
    line(3, "connect", "normal"), line(3, "end", "normal", reason="backend_closed", duration=0.1),
    # 4: spoke plaintext after STARTTLS.
    line(4, "connect", ip="192.0.2.122"),
    line(4, "tls_failed", ip="192.0.2.122", detail="wrong_version_number"),
    line(4, "end", ip="192.0.2.122", reason="tls_failed", duration=0.2),
    # 5: trusted, fast path: no end line, its TLS is the backend's.
    line(5, "connect", "trusted", ip="192.0.2.60"), line(5, "exec", "trusted", ip="192.0.2.60"),
]


def section(text: str, title: str) -> str:
    """The block of the text report that starts with `title` (up to the next blank line)."""
    start = text.index("\n" + title) + 1
    end = text.find("\n\n", start)
    return text[start:end if end >= 0 else len(text)].rstrip("\n")


def test_tls_share(tmp_path):
    log = write(tmp_path / "log", TLS_LOG)
    done = tarpitctl(log)
    assert done.returncode == 0, done.stderr
    tls = section(done.stdout.decode(), "TLS")
    assert re.search(r"^ended\s+4$", tls, re.M)
    assert re.search(r"^  encrypted \(tls=1\)\s+2\s+50%$", tls, re.M)
    assert re.search(r"^    terminated here\s+1$", tls, re.M)
    assert re.search(r"^    pass-through\s+1$", tls, re.M)
    assert re.search(r"^handshake failed\s+1$", tls, re.M)
    assert re.search(r"^fast path \(exec\)\s+1\s", tls, re.M)
    data = json.loads(tarpitctl("--json", log).stdout)
    assert data["tls"] == {"ended": 4, "encrypted": 2, "percent": 50, "terminated": 1,
                           "passthrough": 1, "failed": 1, "fast_path": 1}
    # The new sections leave the funnel alone.
    assert funnel_lines(done.stdout)["connections"] == 5


def guesser_log() -> list[str]:
    out: list[str] = []
    conn = 100
    # A password guesser spread over one /24: 3 addresses, 4 tries each, LOGIN.
    for host in (10, 11, 12):
        for _ in range(4):
            conn += 1
            ip = f"203.0.113.{host}"
            out += [line(conn, "connect", ip=ip),
                    line(conn, "auth", ip=ip, mech="LOGIN", result="fail", code=535),
                    line(conn, "end", ip=ip, reason="too_many_errors", duration=3.0)]
    # One IPv6 /64, two addresses: 2 failures, then the user gets it right (PLAIN).
    for ip, result in (("2001:db8:1:2::5", "fail"), ("2001:db8:1:2:a:b:c:d", "fail"),
                       ("2001:db8:1:2::5", "ok")):
        conn += 1
        extra = {"code": 535} if result == "fail" else {}
        out += [line(conn, "connect", ip=ip),
                line(conn, "auth", ip=ip, mech="PLAIN", result=result, **extra)]
    # Another /64 in the same /48: a network of its own.
    out.append(line(conn + 1, "auth", ip="2001:db8:1:3::1", mech="PLAIN", result="fail", code=535))
    # A roaming user, ok from a /24 with no failure: not listed under failures.
    out.append(line(conn + 2, "auth", ip="198.51.100.77", mech="LOGIN", result="ok"))
    # An IPv4-mapped address is its IPv4 /24; a temporary failure (454) is a failure.
    out.append(line(conn + 3, "auth", ip="::ffff:203.0.113.200", mech="login", result="fail",
                    code=454))
    return out


def test_auth_failures_per_client_network(tmp_path):
    log = write(tmp_path / "log", guesser_log())
    done = tarpitctl(log)
    assert done.returncode == 0, done.stderr
    auth = section(done.stdout.decode(), "AUTH")
    assert re.search(r"^ok\s+2$", auth, re.M)
    assert re.search(r"^failed\s+16$", auth, re.M)
    assert re.search(r"^  LOGIN\s+13\s+1$", auth, re.M)
    assert re.search(r"^  PLAIN\s+3\s+1$", auth, re.M)
    nets = re.findall(r"^  (\S+/\d+)\s+(\d+)\s+(\d+)$", auth, re.M)
    assert nets == [("203.0.113.0/24", "13", "0"), ("2001:db8:1:2::/64", "2", "1"),
                    ("2001:db8:1:3::/64", "1", "0")]
    assert "198.51.100" not in auth

    top1 = section(tarpitctl("--top", "1", log).stdout.decode(), "AUTH")
    assert re.findall(r"^  (\S+/\d+)\s", top1, re.M) == ["203.0.113.0/24"]
    assert "... 2 more networks with failures" in top1
    assert re.search(r"^  LOGIN\s", top1, re.M) and not re.search(r"^  PLAIN\s", top1, re.M)

    data = json.loads(tarpitctl("--json", log).stdout)["auth"]
    assert (data["ok"], data["fail"], data["networks_failing"]) == (2, 16, 3)
    assert data["networks"][:2] == [{"network": "203.0.113.0/24", "fail": 13, "ok": 0},
                                    {"network": "2001:db8:1:2::/64", "fail": 2, "ok": 1}]
    assert {"mech": "LOGIN", "ok": 1, "fail": 13} in data["mechanisms"]


def test_network_of():
    from libtarpit.stats import network_of

    assert network_of("192.0.2.45") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert network_of("::ffff:192.0.2.45") == "192.0.2.0/24"
    assert network_of("fe80::1%eth0") == "fe80::/64"
    assert network_of("-") == network_of(None) == network_of("192.0.2.999") == "-"


def test_error_lines_by_what_and_greylist_store_errors(tmp_path):
    readonly = "sqlite /var/lib/tarpit-smtpd/greylist.sqlite: attempt to write a readonly database"
    lines = []
    for conn in range(1, 6):  # the store fails on every call: twice per connection
        lines += [line(conn, "connect"),
                  line(conn, "error", what="greylist", detail=readonly),
                  line(conn, "error", what="greylist", detail=readonly),
                  line(conn, "end", reason="backend_closed", duration=1.2)]
    lines += [
        line(6, "error", what="greylist",
             detail="redis redis://127.0.0.1:1/0: Error 111 connecting to 127.0.0.1:1. Connection refused."),
        line(7, "error", "-", what="rdns", detail="timeout"),
        line(8, "error", "normal", what="backend", detail="closed in mid-session"),
        line(9, "error", "normal", what="backend", detail="exited with status 1"),
    ]
    log = write(tmp_path / "log", lines)
    done = tarpitctl(log)
    assert done.returncode == 0, done.stderr
    errors = section(done.stdout.decode(), "Errors")
    assert re.findall(r"^  (\w+)\s+(\d+)$", errors, re.M) == [
        ("greylist", "11"), ("backend", "2"), ("rdns", "1")]
    assert "greylist store errors: 11 lines in 6 connections" in errors
    assert re.search(r'^\s+10 x "sqlite \S+: attempt to write a readonly database"$', errors, re.M)
    data = json.loads(tarpitctl("--json", log).stdout)["errors"]
    assert data["total"] == 14 and data["greylist"] == 11 and data["greylist_connections"] == 6
    assert data["by_what"] == [{"what": "greylist", "count": 11}, {"what": "backend", "count": 2},
                               {"what": "rdns", "count": 1}]
    assert data["greylist_details"][0] == {"detail": readonly, "count": 10}


def test_empty_sections_and_seed_log(tmp_path):
    log = write(tmp_path / "log", seed_log(SEED_A_ROWS[:2]))
    text = tarpitctl(log).stdout.decode()
    assert re.search(r"^ended\s+0$", text, re.M)
    assert re.search(r"^failed\s+0$", section(text, "AUTH"), re.M)
    assert section(text, "Errors").endswith("  (none)")


def test_client_text_in_auth_and_errors_is_printed_escaped(tmp_path):
    log = write(tmp_path / "log", [
        'tarpit-smtpd conn=1 pid=1 ip=192.0.2.1 event=auth mech="\x1b[2J' + "X" * 60 + '" result=fail code=535',
        'tarpit-smtpd conn=2 pid=2 ip="\x1b]0;pwned\x07" event=auth mech=PLAIN result=fail code=535',
        'tarpit-smtpd conn=3 pid=3 event=error what=greylist detail="\x1b[31m' + "y" * 300 + '"',
        'tarpit-smtpd conn=4 pid=4 event=error what="\x1b[1mweird"',
    ])
    done = tarpitctl(log)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "\x1b" not in text and "\x07" not in text
    assert re.search(r"^  \?\[2JX+\.\.\.\s+1\s+0$", text, re.M)   # mechanism, capped
    assert re.search(r"^  -\s+1\s+0$", section(text, "AUTH"), re.M)   # not an address
    assert re.search(r'^\s+1 x "\?\[31my+\.\.\."$', text, re.M)
    assert re.search(r"^  \?\[1mweird\s+1$", text, re.M)


# --- --prometheus and the s25r-allow upkeep list (issues 13 and 14), from a real run ---------

# The exposition format, version 0.0.4 (prometheus.io/docs/instrumenting/exposition_formats):
# a metric name, optional {label="value",...}, a float, an optional integer timestamp.
PROM_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
PROM_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
PROM_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN)"
PROM_SAMPLE = re.compile(rf"({PROM_NAME})(?:\{{((?:{PROM_LABEL})(?:,{PROM_LABEL})*,?)?\}})? "
                         rf"({PROM_VALUE})(?: -?\d+)?")
PROM_HELP = re.compile(rf"# HELP ({PROM_NAME}) ((?:[^\\\n]|\\[\\n])*)")
PROM_TYPE = re.compile(rf"# TYPE ({PROM_NAME}) (counter|gauge|histogram|summary|untyped)")
PROM_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def prometheus_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Check `text` against the exposition format strictly; return {(name, labels): value}.

    Every line is a HELP, a TYPE or a sample; each family has one HELP and one TYPE,
    both before its samples, and its samples together; every name starts tarpit_smtpd_;
    no series appears twice; label values are unescaped.
    """
    assert text.endswith("\n") and "\r" not in text
    helps, types, samples = {}, {}, {}
    done: set[str] = set()
    current = None
    for n, row in enumerate(text[:-1].split("\n"), 1):
        if m := PROM_HELP.fullmatch(row):
            assert m[1] not in helps, f"line {n}: second HELP for {m[1]}"
            helps[m[1]] = m[2]
        elif m := PROM_TYPE.fullmatch(row):
            assert m[1] not in types, f"line {n}: second TYPE for {m[1]}"
            assert m[1] in helps, f"line {n}: TYPE before HELP"
            types[m[1]] = m[2]
        elif m := PROM_SAMPLE.fullmatch(row):
            name = m[1]
            assert name in types and name in helps, f"line {n}: {name} before its HELP and TYPE"
            assert name == current or name not in done, f"line {n}: {name}'s samples are split"
            if name != current and current is not None:
                done.add(current)
            current = name
            labels = tuple(sorted(
                (k, re.sub(r"\\(.)", lambda e: "\n" if e[1] == "n" else e[1], v))
                for k, v in PROM_PAIR.findall(m[2] or "")))
            assert len({k for k, _ in labels}) == len(labels), f"line {n}: a label twice"
            assert (name, labels) not in samples, f"line {n}: series {name}{labels} twice"
            samples[(name, labels)] = float(m[3])
            continue
        else:
            raise AssertionError(f"line {n} is not in the exposition format: {row!r}")
        if current is not None:
            done.add(current)
            current = None
    assert set(helps) == set(types)
    assert all(name.startswith("tarpit_smtpd_") for name in helps)
    assert all(types[name] == "counter" and name.endswith("_total") for name in types)
    return samples


PATIENT_IP, QUITTER_IP, LIAR_IP, TRUSTED_IP, SHY_IP = (
    "127.0.0.6", "127.0.1.3", "127.0.2.7", "127.0.0.4", "127.0.0.5")  # taRgrey keys on the /24
PATIENT_NAME = "p5678-ipbf56abcdef.tokyo.ocn.ne.jp"
QUITTER_NAME = "p1234-ipbf56abcdef.tokyo.ocn.ne.jp"
LIAR_NAME = "p2345-ipbf11abcdef.osaka.ocn.ne.jp"
KNOBS = 'TARPIT="1",TARPIT_GREYLIST_DELAY="60"'
RUN_RULES = f"""
{PATIENT_IP}:allow,TCPREMOTEHOST="{PATIENT_NAME}",{KNOBS}
{QUITTER_IP}:allow,TCPREMOTEHOST="{QUITTER_NAME}",{KNOBS}
{LIAR_IP}:allow,TCPREMOTEHOST="{LIAR_NAME}",{KNOBS}
{TRUSTED_IP}:allow,TCPREMOTEHOST="mx.partner.example",RELAYCLIENT=""
{SHY_IP}:allow,TCPREMOTEHOST="mail.example.net",GREETDELAY="2"
"""


def lying_helo(server, src: str) -> bytes:
    """A bot that greets with someone else's address literal; returns the HELO reply."""
    from conftest import recv_reply

    sock = server.connect(src)
    try:
        assert recv_reply(sock).startswith(b"220")
        sock.sendall(b"HELO [8.8.8.8]\r\n")  # public: documentation ranges pass as private
        reply = recv_reply(sock)
        sock.sendall(b"QUIT\r\n")
        recv_reply(sock)
        return reply
    finally:
        sock.close()


@pytest.fixture
def real_log(tarpit_server):
    """A log written by a real tcpserver -> tarpit-smtpd -> tarpit-sink run (see the test)."""
    from test_targrey_e2e import attempt

    server = tarpit_server(RUN_RULES)
    assert attempt(server, PATIENT_IP, deliver=True).startswith(b"250")  # sits through the tarpit
    assert attempt(server, PATIENT_IP, deliver=True).startswith(b"250")  # whitelisted now
    assert attempt(server, QUITTER_IP, give_up_after=0.3) == b""         # leaves in the tarpit
    server.wait_log("event=end reason=tarpit_lost")
    assert attempt(server, QUITTER_IP).startswith(b"450 ")               # retries too early
    assert lying_helo(server, LIAR_IP).startswith(b"5")
    with smtplib_from(server, TRUSTED_IP) as s:                          # fast path
        assert s.noop()[0] == 250
    sock = server.connect(SHY_IP)                                        # leaves in the greet pause
    sock.close()
    server.wait_log("event=greet_lost")
    server.wait_log(r"event=end reason=greet_lost")
    assert len(server.messages()) == 2
    deadline = time.monotonic() + 10  # every wrapper has exited, so all its lines are written
    while server.log().count("tcpserver: pid ") != server.log().count("tcpserver: end "):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    return server.logfile


def smtplib_from(server, src: str):
    import smtplib

    return smtplib.SMTP("127.0.0.1", server.port, source_address=(src, 0), timeout=30)


def test_prometheus_counters_from_a_real_run(real_log):
    done = tarpitctl("--prometheus", real_log)
    assert done.returncode == 0, done.stderr
    got = prometheus_samples(done.stdout.decode())

    def value(name: str, **labels: str) -> float:
        return got[("tarpit_smtpd_" + name, tuple(sorted(labels.items())))]

    # Five suspicious connections (two from the patient MTA, two from the quitter, one
    # liar), one trusted, one normal: what the run above did, read back from its log.
    assert value("connections_total", **{"class": "suspicious"}) == 5
    assert value("connections_total", **{"class": "trusted"}) == 1
    assert value("connections_total", **{"class": "normal"}) == 1
    assert value("fast_path_total") == 1
    assert value("giveups_total", pause="tarpit") == 1
    assert value("giveups_total", pause="greet") == 1
    assert value("greylist_deferrals_total", reason="too_early") == 1
    assert value("greylist_passes_total", reason="whitelisted") == 1
    assert value("tarpit_sat_through_total") == 1
    assert value("passed_total") == 2
    assert value("refusals_total", event="helo_reject", reason="literal") == 1
    # after QUIT and 221 the end is backend_closed or client_closed, whichever closed first
    assert sum(v for (name, labels), v in got.items() if name == "tarpit_smtpd_ends_total"
               and labels in ((("reason", "backend_closed"),), (("reason", "client_closed"),))) == 4
    assert value("ends_total", reason="tarpit_lost") == 1
    assert value("ends_total", reason="greet_lost") == 1
    assert value("tls_total", result="terminated") == 0
    names = {name for name, _ in got}
    assert {"tarpit_smtpd_errors_total", "tarpit_smtpd_auth_total"}.isdisjoint(names)  # none seen
    assert "# TYPE tarpit_smtpd_errors_total counter" in done.stdout.decode()  # but declared

    # The same file read as JSON carries the same numbers: one aggregate, two forms.
    data = json.loads(tarpitctl("--json", real_log).stdout)
    assert data["funnel"]["passed"] == value("passed_total")
    assert data["funnel"]["lost_in_tarpit"] == value("giveups_total", pause="tarpit")


def test_suspicious_names_that_delivered_are_listed_from_a_real_run(real_log):
    data = json.loads(tarpitctl("--json", real_log).stdout)
    # Only the MTA that sat through and delivered: not the one that left in the tarpit and
    # retried too early, not the one refused at HELO, not the trusted or normal clients.
    assert data["delivered_suspicious"] == [{"name": PATIENT_NAME, "count": 2, "rule": "1"}]
    text = section(tarpitctl(real_log).stdout.decode(), "Suspicious clients that delivered")
    assert re.search(rf"^  {re.escape(PATIENT_NAME)}\s+2  1$", text, re.M)
    assert QUITTER_NAME not in text and LIAR_NAME not in text


UPKEEP_LOG = [
    # delivered three times, the last connection greylist-passed
    *[l for i in (1, 2) for l in (line(i, "connect", host="mx1.isp.example"),
                                   line(i, "tarpit_done", host="mx1.isp.example", stage="rcpt",
                                        elapsed=65.0),
                                   line(i, "end", host="mx1.isp.example", reason="backend_closed",
                                        duration=66.0))],
    line(3, "greylist_pass", host="mx1.isp.example", reason="whitelisted"),
    line(3, "end", host="mx1.isp.example", reason="client_closed", duration=1.0),
    # no name: listed by its address
    line(4, "tarpit_done", host="-", ip="203.0.113.9", stage="rcpt", elapsed=65.0),
    line(4, "end", host="-", ip="203.0.113.9", reason="backend_closed", duration=66.0),
    # passed, then its recipient was refused: not delivered
    line(5, "tarpit_done", host="bot.example", stage="rcpt", elapsed=65.0),
    line(5, "rcpt_reject", host="bot.example", rcpt="x@example.com", reason="unknown_user"),
    line(5, "end", host="bot.example", reason="backend_closed", duration=66.0),
    # passed, but the backend died under it
    line(6, "tarpit_done", host="crash.example", stage="rcpt", elapsed=65.0),
    line(6, "error", host="crash.example", what="backend", detail="closed in mid-session"),
    line(6, "end", host="crash.example", reason="backend_closed", duration=66.0),
    # passed, then idled out; and one whose end is not in the log
    line(7, "tarpit_done", host="gone.example", stage="rcpt", elapsed=65.0),
    line(7, "end", host="gone.example", reason="timeout", duration=130.0),
    line(8, "tarpit_done", host="later.example", stage="rcpt", elapsed=65.0),
    # a normal client: not suspicious, not a candidate
    line(9, "connect", "normal", host="mail.example.org"),
    line(9, "end", "normal", host="mail.example.org", reason="backend_closed", duration=0.3),
    # warn mode: the tarpit was not real
    line(10, "tarpit_start", host="warn.example", stage="rcpt", seconds=65, mode="warn"),
    line(10, "end", host="warn.example", reason="backend_closed", duration=0.3),
]


def test_upkeep_list_rules_and_names_option(tmp_path):
    log = write(tmp_path / "log", UPKEEP_LOG)
    data = json.loads(tarpitctl("--json", log).stdout)["delivered_suspicious"]
    assert data == [{"name": "mx1.isp.example", "count": 3, "rule": "1"},
                    {"name": "203.0.113.9", "count": 1, "rule": "1"}]
    one = json.loads(tarpitctl("--json", "--names", "1", log).stdout)["delivered_suspicious"]
    assert [d["name"] for d in one] == ["mx1.isp.example"]
    empty = write(tmp_path / "empty", [line(1, "connect")])
    assert section(tarpitctl(empty).stdout.decode(),
                   "Suspicious clients that delivered").endswith("  (none)")


def test_prometheus_label_values_are_escaped_and_mechanisms_capped(tmp_path):
    weird = 'a"b\\c'
    log = write(tmp_path / "log", [
        line(1, "error", what=weird, detail="x"),
        line(2, "auth", mech="PLAIN", result="ok"),
        *[line(3 + i, "auth", mech=f"MADEUP{i}", result="fail", code=504) for i in range(50)],
        line(60, "helo_reject", helo="foo", reason="nodot", mode="warn"),
    ])
    done = tarpitctl("--prometheus", log)
    assert done.returncode == 0, done.stderr
    got = prometheus_samples(done.stdout.decode())
    assert got[("tarpit_smtpd_errors_total", (("what", weird),))] == 1
    assert 'what="a\\"b\\\\c"' in done.stdout.decode()
    auth = {labels: v for (name, labels), v in got.items() if name == "tarpit_smtpd_auth_total"}
    assert auth == {(("mech", "PLAIN"), ("result", "ok")): 1,
                    (("mech", "other"), ("result", "fail")): 50}
    assert got[("tarpit_smtpd_warn_total", (("event", "helo_reject"),))] == 1


def test_prometheus_respects_since_and_excludes_json(tmp_path):
    now = time.time()
    log = write(tmp_path / "current", [
        tai64n(now - 10 * 86400) + " " + line(1, "connect"),
        tai64n(now - 60) + " " + line(2, "connect", "normal"),
    ])
    got = prometheus_samples(tarpitctl("--prometheus", "--since", "1d", log).stdout.decode())
    assert got[("tarpit_smtpd_connections_total", (("class", "normal"),))] == 1
    assert ("tarpit_smtpd_connections_total", (("class", "suspicious"),)) not in got
    assert got[("tarpit_smtpd_log_lines_total", ())] == 1
    assert tarpitctl("--prometheus", "--json", log).returncode == 100


def test_the_validator_rejects_what_the_format_forbids():
    good = "# HELP tarpit_smtpd_x_total x\n# TYPE tarpit_smtpd_x_total counter\ntarpit_smtpd_x_total 1\n"
    assert prometheus_samples(good) == {("tarpit_smtpd_x_total", ()): 1.0}
    for bad in (good + good.splitlines()[-1] + "\n",                       # series twice
                good.replace("# HELP tarpit_smtpd_x_total x\n", ""),        # no HELP
                good.replace(" 1\n", ' {a="1"} 1\n'),                       # space before labels
                good.replace(" 1\n", '{a="x\ny"} 1\n'),                     # raw line feed
                good.replace(" 1\n", '{a="x"y"} 1\n'),                      # raw quote
                good + "# HELP tarpit_smtpd_x_total again\n"):              # HELP twice
        with pytest.raises(AssertionError):
            prometheus_samples(bad)


def test_deployment_cron_line_writes_the_textfile_atomically(tmp_path):
    """Run docs/deployment.md's cron command for real, its paths moved under tmp_path."""
    doc = (Path(__file__).parent.parent / "docs" / "deployment.md").read_text()
    [cron] = [l for l in doc.splitlines() if "--prometheus" in l and l.lstrip()[:1] in "*0123456789"]
    fields = cron.split(None, 6)
    assert fields[5] == "root", "an /etc/cron.d line names its user"
    command = fields[6]
    textdir = tmp_path / "node-exporter"
    textdir.mkdir()
    logdir = tmp_path / "smtpd"
    logdir.mkdir()
    write(logdir / "current", [line(1, "connect"), line(1, "tarpit_lost", stage="rcpt", elapsed=3.0)])
    command = (command.replace("/var/lib/prometheus/node-exporter", str(textdir))
               .replace("/var/log/qmail/smtpd", str(logdir))
               .replace("/usr/local/bin/tarpitctl", "tarpitctl"))
    assert str(textdir) in command and str(logdir) in command
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in textdir.iterdir()] == ["tarpit_smtpd.prom"], "no temporary file left"
    got = prometheus_samples((textdir / "tarpit_smtpd.prom").read_text())
    assert got[("tarpit_smtpd_giveups_total", (("pause", "tarpit"),))] == 1
    # A failing run (the log is gone) leaves the last good file alone, and no temporary file.
    (logdir / "current").unlink()
    failed = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=60)
    assert b"no such file or directory" in failed.stderr  # cron mails it to root
    assert [p.name for p in textdir.iterdir()] == ["tarpit_smtpd.prom"]
    assert prometheus_samples((textdir / "tarpit_smtpd.prom").read_text()) == got


def test_the_prometheus_sample_in_stats_md_is_valid_and_current(tmp_path):
    """docs/stats.md's sample is in the format, and its HELP lines are the ones printed now."""
    doc = (Path(__file__).parent.parent / "docs" / "stats.md").read_text()
    [sample] = re.findall(r"```\n(# HELP tarpit_smtpd_.*?)```", doc, re.S)
    shown = prometheus_samples(sample)
    printed = tarpitctl("--prometheus", write(tmp_path / "log", [line(1, "connect")])).stdout.decode()
    for help_line in re.findall(r"^# HELP .*$", sample, re.M):
        assert help_line in printed.splitlines(), help_line
    table = {m for m in re.findall(r"^\| `(tarpit_smtpd_\w+)` \|", doc, re.M)}
    assert table == set(re.findall(r"^# TYPE (\S+)", printed, re.M)), "the metric table in stats.md"
    assert {name for name, _ in shown} <= table


def test_upkeep_list_reads_msgs_on_the_end_line_where_the_log_has_it(tmp_path):
    """End lines carry msgs= (messages the backend accepted): passing the tarpit is not delivering."""
    log = write(tmp_path / "log", [
        # passed and quit without a message: not a candidate any more
        line(1, "tarpit_done", host="idle.example", stage="rcpt", elapsed=65.0),
        line(1, "end", host="idle.example", reason="client_closed", duration=66.0, msgs=0),
        # delivered twice, then idled out: a candidate, however it ended
        line(2, "tarpit_done", host="mx2.isp.example", stage="rcpt", elapsed=65.0),
        line(2, "end", host="mx2.isp.example", reason="timeout", duration=400.0, msgs=2),
    ])
    data = json.loads(tarpitctl("--json", log).stdout)["delivered_suspicious"]
    assert data == [{"name": "mx2.isp.example", "count": 1, "rule": "1"}]
