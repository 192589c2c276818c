"""The shipped S25R defaults on the labelled corpus of real reverse names (tests/data/s25r-corpus.tsv).

What a postmaster gets from the shipped files: `tarpitctl s25r --stdin` with
control-examples/s25r-allow as the control directory's list says "match" for
at least 97% of the dynamic names and for none of the large senders' MTAs.
The speed of the same lookups is measured by bench/s25r_corpus.py, not here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "s25r-corpus.tsv"
SHIPPED = ROOT / "control-examples" / "s25r-allow"
GOAL = 0.97


class Row(NamedTuple):
    name: str
    label: str
    large: str
    source: str
    why: str


def _rows() -> list[Row]:
    rows = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            rows.append(Row(*line.split("\t")))
    return rows


def _verdicts(tmp_path: Path, names: list[str], *args: str) -> dict[str, str]:
    """Run tarpitctl s25r --stdin on `names` with the shipped list; return name -> status word."""
    (tmp_path / "s25r-allow").write_bytes(SHIPPED.read_bytes())
    # built-in defaults: no TARPIT_* variable, no tarpit.toml in the control directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARPIT_")}
    proc = subprocess.run(["tarpitctl", "s25r", "--control", str(tmp_path), *args, "--stdin"],
                          input="\n".join(names).encode() + b"\n", capture_output=True, env=env,
                          timeout=120)
    assert proc.stderr == b"" and proc.returncode in (0, 1)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == len(names)
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines}


def test_corpus_is_well_formed() -> None:
    rows = _rows()
    assert len(rows) >= 400
    names = [r.name for r in rows]
    assert len(set(names)) == len(names), "each name once"
    for row in rows:
        assert row.label in ("dynamic", "mta"), row
        assert row.large == ("-" if row.label == "dynamic" else row.large) and row.large in ("-", "yes", "no")
        assert row.source.startswith("github:") and row.why, row
        assert row.name == row.name.strip().rstrip(".") and " " not in row.name
    dynamic = sum(r.label == "dynamic" for r in rows)
    assert 0.35 <= dynamic / len(rows) <= 0.65, "a mix of dynamic and MTA names"
    assert sum(r.large == "yes" for r in rows) >= 100


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return _rows()


# Rule 7 (the dynamic-pool words) is on by default (s25r_extra = true, docs/s25r.md
# "Measured defaults"): tarpitctl s25r follows the built-in configuration.  With it off
# the same files give 96.9% on this corpus (eight pools S25R's digits miss).
def test_shipped_defaults_are_right_97_percent_of_the_time(tmp_path: Path, rows: list[Row]) -> None:
    said = _verdicts(tmp_path, [r.name for r in rows])
    wrong = [r.name for r in rows if (said[r.name] == "match") != (r.label == "dynamic")]
    right = 1 - len(wrong) / len(rows)
    assert right >= GOAL, f"{right:.2%} right; wrong: {' '.join(wrong)}"


@pytest.mark.parametrize("extra", [True, False], ids=["rule7-on", "rule7-off"])
def test_no_large_sender_is_suspicious(tmp_path: Path, rows: list[Row], extra: bool) -> None:
    large = [r.name for r in rows if r.large == "yes"]
    if not extra:  # a site that turns rule 7 off in its tarpit.toml
        (tmp_path / "tarpit.toml").write_text("s25r_extra = false\n")
    said = _verdicts(tmp_path, large)
    assert [n for n in large if said[n] == "match"] == []


def test_bare_s25r_is_measurably_worse(tmp_path: Path, rows: list[Row]) -> None:
    """The same run without the list and the hints: the corpus can tell the defaults apart."""
    said = _verdicts(tmp_path, [r.name for r in rows], "--no-allow", "--no-hints")
    wrong = sum((said[r.name] == "match") != (r.label == "dynamic") for r in rows)
    large_fp = sum(said[r.name] == "match" for r in rows if r.large == "yes")
    assert 1 - wrong / len(rows) < GOAL and large_fp > 0
