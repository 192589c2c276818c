"""Every program answers --help and --version with exit 0, and its usage errors with 100."""

from __future__ import annotations

import subprocess

import pytest

from libtarpit import __version__


@pytest.mark.parametrize("prog", ["tarpit-smtpd", "tarpitctl", "tarpit-sink"])
def test_help_and_version_exit_0(prog):
    out = subprocess.run([prog, "--version"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, f"{prog} {__version__}\n")
    out = subprocess.run([prog, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("usage: ") and prog in out.stdout


@pytest.mark.parametrize("argv", [["tarpit-smtpd"], ["tarpit-sink"], ["tarpitctl"],
                                  ["tarpit-smtpd", "serve", "-Z", "0", "25", "true"]])
def test_usage_errors_exit_100(argv):
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 100 and "usage" in out.stderr.lower()
