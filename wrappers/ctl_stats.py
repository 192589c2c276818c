"""tarpitctl stats: seed 000's give-up table, seed 001's funnel, TLS, AUTH, errors and the
suspicious clients that delivered, from logs; or the counters for Prometheus.

  tarpitctl stats [--bucket 10] [--since WHEN] [--names 20] [--json | --prometheus]
                  [--png FILE] LOGFILE...

LOGFILE is a plain file, a gzip file (by content, whatever its name), a
multilog directory (its @….s/@….u files in order, then `current`) or `-` for
stdin.  The arithmetic lives in libtarpit.stats; this module reads files,
filters by time, prints, and draws the PNG.

Public names: add_arguments, run, read_lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import zlib
from typing import BinaryIO, Iterable, Iterator

from libtarpit import stats
from libtarpit.log import parse_line

PROG = "tarpitctl stats"
PLOT_HINT = "install matplotlib (pip install tarpit-smtpd[plot])"


class _Usage(Exception):
    """Bad arguments or unreadable input named by the user: exit 100."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of `tarpitctl stats`."""
    parser.add_argument("--bucket", type=int, default=10, metavar="SECONDS",
                        help="bucket width; elapsed is rounded to the nearest (default 10)")
    parser.add_argument("--marks", default="35,45,65", metavar="S,S,…",
                        help="cumulative rows 'up to S s' (default 35,45,65)")
    parser.add_argument("--since", metavar="WHEN",
                        help="only lines from WHEN on: 2026-11-01, '2026-11-01 12:00', 7d, 12h")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="how many reasons, error kinds and AUTH-failing networks "
                             "to list (default 10)")
    parser.add_argument("--names", type=int, default=stats.UPKEEP_TOP, metavar="N",
                        help="how many suspicious clients that delivered to list "
                             f"(default {stats.UPKEEP_TOP})")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print one JSON object")
    form.add_argument("--prometheus", action="store_true",
                      help="print the counters in the Prometheus text format "
                           "(node_exporter's textfile collector)")
    parser.add_argument("--png", metavar="FILE",
                        help="draw the histogram and cumulative curve (needs matplotlib)")
    parser.add_argument("logfiles", nargs="+", metavar="LOGFILE",
                        help="log file, .gz, multilog directory, or - for stdin")


def run(args: argparse.Namespace) -> int:
    """Print the report; return 0, 100 (usage, missing file or matplotlib) or 111 (I/O)."""
    now = time.time()
    try:
        marks = _parse_marks(args.marks)
        since = stats.parse_since(args.since, now) if args.since else None
        if args.bucket < 1:
            raise _Usage("--bucket must be at least 1")
        if args.png and not _have_matplotlib():
            raise _Usage(PLOT_HINT)
        events, untimed = _collect(read_lines(args.logfiles), since, now)
    except (_Usage, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 100
    except OSError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 111
    if since is not None and untimed:
        print(f"{PROG}: {untimed} lines had no time and were kept", file=sys.stderr)
    if not events:
        print(f"{PROG}: no tarpit-smtpd lines found", file=sys.stderr)
    report = stats.build_report(events, args.bucket, marks, args.top, args.names)
    _print(report, "json" if args.json else "prometheus" if args.prometheus else "text")
    return _draw(report.giveup, args.png) if args.png else 0


def _parse_marks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise _Usage(f"bad --marks {text!r}: use whole seconds like 35,45,65") from None


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401  (optional extra "plot")
    except ImportError:
        return False
    return True


def _collect(lines: Iterable[str], since: float | None,
             now: float) -> tuple[list[dict[str, str]], int]:
    events: list[dict[str, str]] = []
    untimed = 0
    for line in lines:
        event = parse_line(line)
        if event is None:
            continue
        if since is not None:
            when = stats.line_time(line, now)
            if when is None:
                untimed += 1
            elif when < since:
                continue
        events.append(event)
    return events, untimed


def read_lines(paths: Iterable[str]) -> Iterator[str]:
    """Yield the text lines of every LOGFILE in order (see the module docstring).

    Bytes that are not UTF-8 are replaced, so a binary file only yields lines
    that are not ours.  Raises _Usage for a missing path, OSError for others.
    """
    for path in paths:
        if path == "-":
            yield from _decode(sys.stdin.buffer)
        elif os.path.isdir(path):
            for name in _multilog_files(path):
                yield from _read_file(os.path.join(path, name))
        elif not os.path.exists(path):
            raise _Usage(f"{path}: no such file or directory")
        else:
            yield from _read_file(path)


def _multilog_files(directory: str) -> list[str]:
    # multilog names rotated files by their TAI64N time, so name order is time order.
    names = sorted(n for n in os.listdir(directory)
                   if n.startswith("@") and n.endswith((".s", ".u")))
    if os.path.isfile(os.path.join(directory, "current")):
        names.append("current")
    if not names:
        print(f"{PROG}: {directory}: no multilog files (current, @….s) found", file=sys.stderr)
    return names


def _read_file(path: str) -> Iterator[str]:
    with open(path, "rb") as raw:
        if raw.peek(2)[:2] != b"\x1f\x8b":
            yield from _decode(raw)
            return
        try:
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield from _decode(unzipped)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            # A log being compressed right now is truncated: keep what was there.
            print(f"{PROG}: {path}: damaged gzip data ({e}); read what was there",
                  file=sys.stderr)


def _decode(stream: BinaryIO) -> Iterator[str]:
    for raw in stream:
        yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


def _print(report: stats.Report, form: str) -> None:
    if form == "json":
        print(json.dumps(stats.report_to_dict(report), indent=2))
    elif form == "prometheus":
        sys.stdout.write(stats.format_prometheus(stats.metrics(report)))
    else:
        sys.stdout.write(stats.format_report(report))


def _draw(table: stats.GiveupTable, path: str) -> int:
    try:
        _plot(table, path)
    except OSError as e:
        print(f"{PROG}: cannot write {path}: {e}", file=sys.stderr)
        return 111
    return 0


def _plot(table: stats.GiveupTable, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.bucket for r in table.rows]
    lc = [r.lc for r in table.rows]
    pl = [r.pl for r in table.rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = table.bucket_size * 0.8
    ax.bar(xs, lc, width=width, label="LC (lost connection)")
    ax.bar(xs, pl, width=width, bottom=lc, label="PL (talked before our reply)")
    ax.set_xlabel(f"seconds since the tarpit started (nearest {table.bucket_size} s)")
    ax.set_ylabel("connections")
    ax.legend(loc="center right")
    curve = ax.twinx()
    curve.plot(*_cumulative_curve(table), color="black", marker=".", label="cumulative %")
    curve.set_ylim(0, 100)
    curve.set_ylabel("cumulative % of those that gave up")
    for c in table.cumulative:
        curve.annotate(f"{c.percent}% by {c.mark} s", (c.mark, c.percent),
                       textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_title(f"Gave up during the tarpit (total {table.total})")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _cumulative_curve(table: stats.GiveupTable) -> tuple[list[float], list[float]]:
    # Each point sits at its bucket's upper edge: everything rounded into it is below.
    xs: list[float] = []
    ys: list[float] = []
    running = 0
    for row in table.rows:
        running += row.lc + row.pl
        xs.append(row.bucket + table.bucket_size / 2)
        ys.append(100.0 * running / table.total if table.total else 0.0)
    return xs, ys
