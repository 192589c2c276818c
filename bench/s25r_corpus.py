#!/usr/bin/env python3
"""S25R on a labelled corpus: accuracy, errors by name and lookup cost of each candidate default.

  python3 bench/s25r_corpus.py                       # tests/data/s25r-corpus.tsv
  python3 bench/s25r_corpus.py --corpus FILE --rounds 30 --cold 20 --quiet

For each variant: accuracy (right / all), false positives (an MTA called
suspicious; "L" marks a large sender), false negatives (a dynamic name let
through), and what one lookup costs.  "Before" is libtarpit/s25r.py and
control-examples/s25r-allow as they were at BEFORE (the commit before the
measured defaults), loaded from git; "after" is the working tree.

Cost, both timed in this run against bare S25R (the before module, rules 1-6
only), interleaved, best of the rounds:
  warm  microseconds per name, all corpus names through classify() with the
        allow-list loaded once (a long-running `tarpit-smtpd serve`)
  cold  milliseconds for what one wrapper process pays per connection: import
        the module, load the shipped allow-list, classify one name; in a fresh
        interpreter each time (`re` already imported, as the wrapper has it),
        median over --cold runs for an MTA name that matches no rule, a dynamic
        name, and a hinted MTA name
Exit status 0 when the run completed (whatever the numbers), 1 on a usage or
git error.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "s25r-corpus.tsv"
SHIPPED = ROOT / "control-examples" / "s25r-allow"
BEFORE = "e4cd237"  # the tree this work started from: s25r.py of 17587d8, the 17-entry allow-list
COLD_NAMES = ("mail.gentoo.org", "p5b0c6380.dip0.t-ipconnect.de", "smtp-out2-04.simnet.is")


class Row(NamedTuple):
    name: str
    dynamic: bool
    large: bool


class Variant(NamedTuple):
    title: str
    suspicious: Callable[[str], bool]
    timed: bool = True  # False: computed through a slower path, its cost means nothing


CANDIDATE_HINTS = ("mail", "mx", "smtp", "out", "relay", "static", "dedicated")


def load_corpus(path: Path) -> list[Row]:
    """Return the corpus rows; raise ValueError on a line that is not five tab-separated fields."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 5 or fields[1] not in ("dynamic", "mta"):
            raise ValueError(f"{path}:{number}: not name<TAB>dynamic|mta<TAB>large<TAB>source<TAB>why")
        rows.append(Row(fields[0], fields[1] == "dynamic", fields[2] == "yes"))
    return rows


def before_files(work: Path) -> tuple[Path, Path]:
    """Write s25r.py and s25r-allow as of BEFORE into `work`; return their paths.

    Raises subprocess.CalledProcessError when git cannot show them.
    """
    module = work / "s25r_before.py"
    allow = work / "s25r-allow.before"
    for rel, dest in (("libtarpit/s25r.py", module), ("control-examples/s25r-allow", allow)):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:{rel}"],
                              check=True, capture_output=True).stdout
        dest.write_bytes(text)
    return module, allow


def import_path(name: str, path: Path) -> ModuleType:
    """Import the module at `path` under `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(old: ModuleType, new: ModuleType, old_allow: Path) -> list[Variant]:
    """Return the variants measured, bare S25R first (the timing baseline)."""
    a_old = old.AllowList.load(old_allow)
    a_new = new.AllowList.load(SHIPPED)
    a_new_in_old = old.AllowList.load(SHIPPED)
    a_old_in_new = new.AllowList.load(old_allow)

    def v(title: str, module: ModuleType, allow: object, **kw: object) -> Variant:
        classify = module.classify
        return Variant(title, lambda n: classify(n, None, allow, **kw).suspicious)

    out = [
        v("bare S25R (rules 0-6)", old, None),
        v("shipped before: 17 allow entries", old, a_old),
        v("  before + allow-list additions", old, a_new_in_old),
        v("  before + rule 7 on", old, a_old, extra=True),
        v("  before + allow-list additions + rule 7", old, a_new_in_old, extra=True),
        v("  after, before's allow-list", new, a_old_in_new, extra=True),
        v("  after, rule 7 off (s25r_extra = false)", new, a_new),
        v("  after, hints off", new, a_new, extra=True, hints=False),
    ]
    for word in CANDIDATE_HINTS:
        if word in new.HINT_WORDS:
            words = new.HINT_WORDS - {word}
            title = f"  after, without hint {word!r}"
        else:
            words = new.HINT_WORDS | {word}
            title = f"  after, plus hint {word!r}"
        out.append(_hint_variant(new, a_new, words, title))
    out.append(v("shipped after: allow + hints + rule 7", new, a_new, extra=True))
    return out


def _hint_variant(new: ModuleType, allow: object, words: frozenset[str], title: str) -> Variant:
    """Return the after variant (rule 7 on) with another set of hint words."""
    def suspicious(name: str) -> bool:
        verdict = new.classify(name, None, allow, extra=True, hints=False)
        if verdict.suspicious and 1 <= verdict.rule <= 5 and _hinted(new, name, words):
            return False
        return verdict.suspicious

    return Variant(title, suspicious, timed=False)


def _hinted(new: ModuleType, name: str, words: frozenset[str]) -> bool:
    """server_hint with another word set: a word of `words`, no dynamic word."""
    found = [w for ws in new._host_words(name) for w in ws]
    return not new.DYNAMIC_WORDS.intersection(found) and bool(words.intersection(found))


def score(rows: list[Row], variant: Variant) -> tuple[float, list[Row], list[Row]]:
    """Return accuracy, false positives and false negatives of `variant` on `rows`."""
    fp, fn = [], []
    for row in rows:
        said = variant.suspicious(row.name)
        if said and not row.dynamic:
            fp.append(row)
        elif not said and row.dynamic:
            fn.append(row)
    return 1 - (len(fp) + len(fn)) / len(rows), fp, fn


def warm_costs(rows: list[Row], todo: list[Variant], rounds: int) -> list[float | None]:
    """Return microseconds per name for each timed variant (None for the others), best of `rounds`."""
    names = [r.name for r in rows]
    best: list[float | None] = [float("inf") if v.timed else None for v in todo]
    gc.disable()
    try:
        for _ in range(rounds + 1):  # the first round warms up and is thrown away
            for i, variant in enumerate(todo):
                if not variant.timed:
                    continue
                f = variant.suspicious
                t0 = time.perf_counter()
                for n in names:
                    f(n)
                spent = (time.perf_counter() - t0) / len(names) * 1e6
                if _ > 0:
                    best[i] = min(best[i], spent)  # type: ignore[type-var]
    finally:
        gc.enable()
    return best


COLD = """
import re, sys, time
sys.path[:0] = [{root!r}, {work!r}]
import libtarpit.errors
t0 = time.perf_counter()
import {module} as m
a = m.AllowList.load({allow!r}) if {allow!r} else None
m.classify({name!r}, "192.0.2.1", a, extra={extra})
print(time.perf_counter() - t0)
"""


def cold_costs(work: Path, old_allow: Path, runs: int) -> list[tuple[str, str, list[float]]]:
    """Return (name, "", [ms bare, shipped before, shipped after]) medians; the first run is thrown away."""
    setups = [("bare (before)", "s25r_before", "", False),
              ("shipped before", "s25r_before", str(old_allow), False),
              ("shipped after", "libtarpit.s25r", str(SHIPPED), True)]
    # bytecode cached, as an installed package has it (this environment may
    # set PYTHONDONTWRITEBYTECODE, and the before module is a fresh file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    out = []
    for name in COLD_NAMES:
        samples: list[list[float]] = [[] for _ in setups]
        for run in range(runs + 1):
            for i, (_, module, allow, extra) in enumerate(setups):
                code = COLD.format(root=str(ROOT), work=str(work), module=module, allow=allow,
                                   name=name, extra=extra)
                done = subprocess.run([sys.executable, "-S", "-c", code], env=env,
                                      check=True, capture_output=True, text=True)
                if run > 0:
                    samples[i].append(float(done.stdout) * 1e3)
        out.append((name, "", [statistics.median(s) for s in samples]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--rounds", type=int, default=15, help="warm timing rounds (best of)")
    parser.add_argument("--cold", type=int, default=15, help="fresh interpreters per cold case")
    parser.add_argument("--quiet", action="store_true", help="counts only, no names")
    args = parser.parse_args(argv)
    try:
        rows = load_corpus(args.corpus)
    except (OSError, ValueError) as e:
        print(f"s25r_corpus: {e}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="s25r-bench-") as tmp:
        work = Path(tmp)
        try:
            module_path, old_allow = before_files(work)
        except subprocess.CalledProcessError as e:
            print(f"s25r_corpus: git show {BEFORE}: {e.stderr.decode().strip()}", file=sys.stderr)
            return 1
        sys.path.insert(0, str(ROOT))
        old = import_path("s25r_before", module_path)
        from libtarpit import s25r as new

        todo = variants(old, new, old_allow)
        dyn = sum(r.dynamic for r in rows)
        large = sum(r.large for r in rows)
        print(f"corpus {args.corpus.name}: {len(rows)} names, {dyn} dynamic, {len(rows) - dyn} mta "
              f"({large} from large senders); before = {BEFORE}")
        costs = warm_costs(rows, todo, args.rounds)
        base = costs[0]
        assert base is not None
        print(f"\n{'variant':46} {'right':>7} {'FP':>4} {'(L)':>4} {'FN':>4} {'us/name':>8} {'x bare':>7}")
        detail = []
        for variant, cost in zip(todo, costs):
            acc, fp, fn = score(rows, variant)
            nl = sum(r.large for r in fp)
            timing = f"{cost:8.2f} {cost / base:7.2f}" if cost is not None else f"{'-':>8} {'-':>7}"
            print(f"{variant.title:46} {acc:7.2%} {len(fp):4} {nl:4} {len(fn):4} {timing}")
            detail.append((variant.title, fp, fn))
        if not args.quiet:
            for title, fp, fn in (detail[0], detail[1], detail[-1]):
                print(f"\n{title.strip()}:")
                print("  FP: " + (" ".join(r.name + (" (L)" if r.large else "") for r in fp) or "-"))
                print("  FN: " + (" ".join(r.name for r in fn) or "-"))
        if args.cold > 0:
            print(f"\ncold, one fresh interpreter per lookup: import + load shipped list + classify, "
                  f"median of {args.cold}, ms")
            print(f"{'name':34} {'bare':>7} {'before':>7} {'after':>7} {'after-before':>13}")
            for name, _, (bare, before, after) in cold_costs(work, old_allow, args.cold):
                print(f"{name:34} {bare:7.3f} {before:7.3f} {after:7.3f} {after - before:+13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
