"""The install that scripts/setup.sh makes, as a postmaster and tcpserver see it.

setup.sh puts a venv at $TARPIT_PREFIX (/opt/tarpit-smtpd) and links its programs into
$TARPIT_BINDIR (/usr/local/bin), where tcpserver run files name them.  These tests check that
those names run the venv's interpreter and its regular (not editable) copy of the package, and
that the programs the end-to-end tests start by name are those.  Without the venv they skip,
saying so; under TEST_REQUIRE_ALL (the README's test command) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PREFIX = Path(os.environ.get("TARPIT_PREFIX") or "/opt/tarpit-smtpd")
BINDIR = Path(os.environ.get("TARPIT_BINDIR") or "/usr/local/bin")
PROGRAMS = ("tarpit-smtpd", "tarpitctl", "tarpit-sink")


@pytest.fixture
def venv_python() -> Path:
    python = PREFIX / "bin" / "python"
    if not os.access(python, os.X_OK):
        if os.environ.get("TEST_REQUIRE_ALL"):
            pytest.fail(f"no venv at {PREFIX} but TEST_REQUIRE_ALL is set (scripts/setup.sh makes it)")
        pytest.skip(f"no venv at {PREFIX} (TARPIT_PREFIX); sh scripts/setup.sh makes it")
    return python


def shebang(path: Path) -> str:
    with open(path, "rb") as f:  # follows the link, as the kernel does
        first = f.readline().decode()
    assert first.startswith("#!"), f"{path} is not a script: {first!r}"
    return first[2:].split()[0]


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_linked_program_runs_the_venvs_python(venv_python, program):
    """/usr/local/bin/tarpit-smtpd, the name a run file uses, starts the venv's interpreter directly."""
    link = BINDIR / program
    assert link.exists(), f"{link} missing: scripts/setup.sh links it"
    assert shebang(link) == str(venv_python)


def test_the_wrapper_runs_isolated_from_the_environments_python_variables(venv_python, tmp_path):
    """tarpit-smtpd starts with python -I -S: a PYTHONPATH in its environment (a tcprules
    variable, an envdir) cannot put other code in front of the wrapper's own."""
    (tmp_path / "libtarpit").mkdir()
    (tmp_path / "libtarpit" / "__init__.py").write_text("raise SystemExit('hijacked')\n")
    done = subprocess.run([str(BINDIR / "tarpit-smtpd"), "--version"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert done.returncode == 0 and "hijacked" not in done.stderr, done.stderr
    assert done.stdout.startswith("tarpit-smtpd ")
    with open(BINDIR / "tarpit-smtpd") as f:
        assert f.readline().split()[1:] == ["-IS"]


def test_the_program_on_path_is_the_installed_one(venv_python):
    """The tests (and tcpserver under them) start `tarpit-smtpd` by name: it must be the venv's."""
    found = shutil.which("tarpit-smtpd")
    installed = BINDIR / "tarpit-smtpd"
    if found is None or Path(found).resolve() != installed.resolve():
        reason = (f"tarpit-smtpd on PATH is {found}, not {installed} -> {installed.resolve()}: "
                  f"the end-to-end tests run that one (scripts/test.sh puts {BINDIR} first)")
        if os.environ.get("TEST_REQUIRE_ALL"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert shebang(Path(found)) == str(venv_python)


def test_the_venv_has_a_regular_install_of_the_package(venv_python, tmp_path):
    """Not editable: the modules come from the venv's site-packages, not from a source tree."""
    out = subprocess.run(
        [str(venv_python), "-c",
         "import sys, libtarpit, tarpit_wrappers; print(libtarpit.__file__); print(tarpit_wrappers.__file__);"
         "print(sys.version_info >= (3, 11))"],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    lib, wrappers, new_enough = out.stdout.split()
    for module in (lib, wrappers):
        assert Path(module).is_relative_to(PREFIX / "lib"), module
    assert new_enough == "True"


@pytest.mark.parametrize("page, section", [("tarpit-smtpd", "8"), ("tarpitctl", "8"), ("tarpit.toml", "5")])
def test_man_finds_each_page_and_it_renders_cleanly(venv_python, page, section):
    """`man tarpit-smtpd` works after the install, and groff has nothing to warn about."""
    if shutil.which("man") is None:
        pytest.fail("man not installed: scripts/setup.sh installs man-db")
    where = subprocess.run(["man", "-w", section, page], capture_output=True, text=True)
    assert where.returncode == 0 and str(PREFIX) in os.path.realpath(where.stdout.strip()), where
    shown = subprocess.run(["man", "--warnings", section, page], capture_output=True, text=True,
                           env=dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat"))
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert "SEE ALSO" in shown.stdout


def test_tarpit_toml_page_lists_every_knob_the_code_has(venv_python):
    from libtarpit.config import ENV_KEYS, GLOBAL_ENV

    page = subprocess.run(["man", "5", "tarpit.toml"], capture_output=True, text=True,
                          env=dict(os.environ, MANWIDTH="200", MANPAGER="cat", PAGER="cat")).stdout
    missing = [var for var in (*ENV_KEYS.values(), *GLOBAL_ENV.values()) if var not in page]
    assert not missing, missing
