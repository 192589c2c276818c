"""tarpitctl check: what a postmaster sees before turning the wrapper on."""

from __future__ import annotations

import os
import subprocess


def check(tmp_path, *args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("TARPIT")}
    full.update(TARPIT_CONTROL=str(tmp_path), TARPIT_GREYLIST_URL=str(tmp_path / "g.sqlite"))
    full.update(env or {})
    return subprocess.run(["tarpitctl", "check", *args], capture_output=True, text=True, env=full)


def test_defaults_show_each_class_and_its_path(tmp_path):
    (tmp_path / "s25r-allow").write_text(".google.com\n")
    out = check(tmp_path, "--tcpserver=-vRl0 -hp")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "class trusted    exec fast path" in out.stdout
    assert "class normal     exec fast path" in out.stdout, "no lists: nothing to check for normal clients"
    assert "tarpit 65 s at RCPT (enforce); greylist targrey" in out.stdout
    assert "reachable and writable, 0 records" in out.stdout


def test_warn_mode_and_lists_move_normal_clients_to_the_proxy(tmp_path):
    (tmp_path / "badheloarg").write_text("localhost\n")
    out = check(tmp_path, "--no-store", env={"TARPIT_MODE": "warn"})
    assert "mode=warn" in out.stdout
    assert "tarpit 65 s at RCPT (warn)" in out.stdout
    assert "class normal     proxy" in out.stdout and "badheloarg on (warn)" in out.stdout
    assert out.returncode == 1, "missing s25r-allow is a warning"


def test_minus_H_is_warned_about(tmp_path):
    out = check(tmp_path, "--no-store", "--tcpserver=-vRHl0")
    assert "WARNING  tcpserver -H" in out.stdout and out.returncode == 1
    out = check(tmp_path, "--no-store", "--tcpserver=-vRHl0", env={"TARPIT_RDNS": "1"})
    assert "WARNING  tcpserver -H" not in out.stdout


def test_corrupt_list_is_111_and_bad_config_is_100(tmp_path):
    (tmp_path / "rcptusers.cdb").write_bytes(b"not a cdb at all")
    out = check(tmp_path, "--no-store")
    assert out.returncode == 111 and "ERROR" in out.stdout and "451" in out.stdout
    out = check(tmp_path, env={"TARPIT": "soon"})
    assert out.returncode == 100 and "$TARPIT" in out.stderr
    (tmp_path / "tarpit.toml").write_text("[suspicious]\ntarpit = 30\nbogus = 1\n")
    out = check(tmp_path)
    assert out.returncode == 100 and "unknown key [suspicious] bogus" in out.stderr


def test_tarpitctl_reads_the_same_tarpit_toml_as_the_wrapper(tmp_path):
    store = tmp_path / "from-toml.sqlite"
    (tmp_path / "tarpit.toml").write_text(f'greylist_url = "{store}"\ns25r_extra = true\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARPIT")}
    env["TARPIT_CONTROL"] = str(tmp_path)
    done = subprocess.run(["tarpitctl", "greylist", "whitelist-add", "192.0.2.1"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert store.exists(), "the store named in tarpit.toml was used"
    done = subprocess.run(["tarpitctl", "s25r", "mail.dynamic.example.net"], env=env,
                          capture_output=True, text=True)
    assert done.stdout.strip().split("\t")[1:] == ["match", "rule=7"], "s25r_extra from tarpit.toml"


def test_the_store_is_tried_as_the_wrapper_user_and_a_root_owned_database_is_an_error(user_python):
    """deployment.md's order used to leave a root-owned greylist.sqlite that `check` called fine."""
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the wrapper's user")
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="tarpit-check-", dir="/tmp"))  # pytest's tmp is 0700 root
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        db = state / "greylist.sqlite"
        env = {"TARPIT_STATE_DIR": str(state), "TARPIT_GREYLIST_URL": str(db)}
        bindir = user_python("nobody")  # a tarpitctl whose interpreter nobody can run too
        if bindir is not None:
            env["PATH"] = f"{bindir}:{os.environ['PATH']}"
        out = check(base, env=env)
        assert "as nobody: reachable and writable" in out.stdout, out.stdout + out.stderr
        assert db.stat().st_uid == nobody.pw_uid, "the file it made is the wrapper's"
        for p in state.iterdir():
            os.chown(p, 0, 0)
            os.chmod(p, 0o644)
        out = check(base, env=env)
        assert "as nobody: ERROR" in out.stdout and "readonly" in out.stdout and out.returncode == 111, out.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_dnswl_is_checked_only_when_on_and_a_dead_zone_is_a_warning(tmp_path):
    import socket

    (tmp_path / "s25r-allow").write_text(".google.com\n")
    out = check(tmp_path, "--no-store", "--tcpserver=-vRl0 -hp")
    assert out.returncode == 0 and not [ln for ln in out.stdout.splitlines() if "dnswl " in ln]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:  # a nameserver that never answers
        dead.bind(("127.0.0.1", 0))
        env = {"TARPIT_DNSWL": "list.dnswl.test", "TARPIT_DNSWL_TIMEOUT": "0.3",
               "TARPIT_DNSWL_SERVER": f"127.0.0.1:{dead.getsockname()[1]}"}
        out = check(tmp_path, "--no-store", "--tcpserver=-vRl0 -hp", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "WARNING  dnswl list.dnswl.test: timeout within 0.3 s at 127.0.0.1:" in out.stdout


def test_a_misspelt_variable_is_a_warning(tmp_path):
    out = check(tmp_path, "--no-store", "--tcpserver=-vRl0 -hp", env={"TARPIT_TARPTI": "60"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "WARNING  TARPIT_TARPTI is not a variable tarpit-smtpd reads" in out.stdout
