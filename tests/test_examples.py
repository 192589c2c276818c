"""The shipped examples are what the docs say they are."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import need
from libtarpit.config import DEFAULTS, Config, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "control-examples"


def test_example_tarpit_toml_loads_to_the_built_in_defaults():
    cfg = load_config({}, (EXAMPLES / "tarpit.toml").read_text(), "tarpit.toml")
    assert cfg == Config(classes=dict(DEFAULTS))


def test_example_tcp_smtp_compiles_with_tcprules(tmp_path):
    need("tcprules")
    with open(EXAMPLES / "tcp.smtp") as f:
        done = subprocess.run(["tcprules", str(tmp_path / "tcp.smtp.cdb"), str(tmp_path / "tmp")],
                              stdin=f, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tcp.smtp.cdb").stat().st_size > 2048


def test_example_control_lists_compile(tmp_path):
    for name in ("badheloarg", "rcptusers"):
        out = tmp_path / f"{name}.cdb"
        done = subprocess.run(["tarpitctl", "cdb", str(EXAMPLES / name), "-o", str(out)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    done = subprocess.run(["tarpitctl", "s25r", "--control", str(EXAMPLES), "mail-yw1-f170.google.com"],
                          capture_output=True, text=True)
    assert done.stdout.split("\t")[1] == "allow"
