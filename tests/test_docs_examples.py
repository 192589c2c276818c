"""Every command and example in README.md, docs/*.md and docs/man/*.md works as shown.

Fenced code blocks are read from every such file (a glob: new pages are picked up), and
each example becomes its own test, with the id FILE:LINE of its first line:

- ```sh, ```console, ```shell, ```bash and untagged blocks: every command whose program is
  ours (`tarpitctl`, `tarpit-smtpd`, `tcpserver` running one of ours) is checked; in a block
  with `$ ` prompts only the prompted lines are commands. A command may come after cron
  fields and a user, `exec`, `env VAR=...`, `setuidgid USER`, `runuser -u USER --`,
  `softlimit ...`, `envdir DIR`, or after a `|` (it then reads the test log on stdin).
  Redirections are dropped. Then:
    * `tarpitctl ...` runs for real, its paths moved into a fixture (PATHS below: a control
      directory with lists, a multilog directory of real-shaped log lines, a state
      directory with the greylist store); it must exit 0 (`tarpitctl s25r`: 0 or 1, its
      answer), or the status the block shows after it (`$ echo $?`). When the block shows it failing (`exit N` in its output:
      a broken file we do not have), its command line is only parsed;
    * a synopsis (`[`, `...` or `A|B` in it) is not run: each option in it must be one the
      parser knows;
    * `tarpit-smtpd serve ...` is read by libtarpit.serveargs, as serve reads it;
    * `tcpserver ...` is read with tcpserver 0.88's option letters; the program after host
      and port must be one we install (pyproject's scripts);
    * `tarpit-smtpd --help` / `--version` run; other `tarpit-smtpd BACKEND` lines need a backend.
- a log line in such a block (`tarpit-smtpd conn=...`, with or without a collector's
  stamp): read back by libtarpit.log.parse_line, its fields in the documented order, its
  event one that docs/logs.md documents.
- ```toml: loaded by libtarpit.config.load_config (an unknown key or bad value fails).
- tcprules content (every line `ADDRESS:allow|deny...`): compiled by the real `tcprules`,
  and each rule's variables loaded by libtarpit.config.load_config as the wrapper would.
- an untagged block under prose or a heading that names one control list (`badheloarg`,
  `rcptusers`, `s25r-allow`) and holds no command or log line: compiled by `tarpitctl cdb`
  (`s25r-allow`: read by `tarpitctl check`).
- ```python: compiled, and its import statements run.
- other tags (```ini, ```text, ```postfix-main-cf ...) are someone else's syntax: skipped.

Placeholders a reader replaces (PLACEHOLDERS) get a value of the right shape.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from libtarpit.log import format_line

ROOT = Path(__file__).resolve().parent.parent
SHELL_TAGS = {"sh", "shell", "console", "bash", ""}
CONTROL_LISTS = ("badheloarg", "rcptusers", "s25r-allow")
# Real paths in the docs -> the fixture's (relative to its base directory).
PATHS = {
    "/var/qmail/control": "control",
    "/var/log/qmail/smtpd": "log",
    "/var/log/tarpit-smtpd": "log",
    "/var/lib/tarpit-smtpd": "state",
    "/var/lib/prometheus/node-exporter": "textfile",
    "/etc/tcp.smtp": "tcp.smtp",
}
# Program paths in the docs -> the program on PATH (this checkout, installed editable).
PROGRAMS = ("/usr/local/bin/", "/opt/tarpit-smtpd/bin/", "/usr/bin/")
PLACEHOLDERS = {
    "QMAILD_UID": str(os.getuid()), "NOFILES_GID": str(os.getgid()),
    "$(id -u qmaild)": str(os.getuid()), "$(id -g nofiles)": str(os.getgid()),
    "$(id -g qmaild)": str(os.getgid()),
    "$QMAILDUID": str(os.getuid()), "$NOFILESGID": str(os.getgid()),
    "$MAXSMTPD": "100", "$LOCAL": "mx.example.com",
}
# tcpserver 0.88's getopt string (tcpserver.c main): letters, ':' after those with an argument
TCPSERVER_OPTS = "dDvqQhHrR1UXx:t:u:g:l:b:B:c:pPoO"
WRAPPERS = ("exec", "nice", "nohup")
FILTERS = ("printf", "echo", "cat", "zcat", "sed", "grep", "head", "tail", "sort", "uniq", "awk")
LOG_FIELDS = ["conn", "pid", "ip", "host", "class", "rule", "event"]
RUNNERS = ("env", "setuidgid", "envdir", "runuser", "softlimit")
OURS = ("tarpitctl", "tarpit-smtpd", "tcpserver")


@dataclass(frozen=True)
class Example:
    """One thing to check: where it is, what kind, its text, and (commands) the block's rest."""

    path: str
    line: int
    kind: str
    text: str
    expect: int | None = None  # documented exit status; None: 0
    shown_failing: bool = False

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "docs" / "man").glob("*.md"))]


def blocks(text: str):
    """Yield (tag, first content line number, content lines, the prose before) per fenced block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^( *)(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, tag = len(m[1]), m[2], m[3].lower()
        start = i + 1
        j = start
        while j < len(lines) and not re.match(rf"^ *{fence[0]}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        content = [l[indent:] if l[:indent].strip() == "" else l for l in lines[start:j]]
        yield tag, start + 1, content, _context(lines, i)
        i = j + 1


def _context(lines: list[str], fence: int) -> str:
    """The paragraph right before a fence, and the nearest heading above it."""
    k = fence - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    para = []
    while k >= 0 and lines[k].strip() and not lines[k].startswith("#") and "```" not in lines[k]:
        para.append(lines[k])
        k -= 1
    heading = next((lines[h] for h in range(fence - 1, -1, -1) if lines[h].startswith("#")), "")
    return heading + "\n" + "\n".join(reversed(para))


def _is_tcprules(content: list[str]) -> bool:
    rules = [l for l in content if l.strip() and not l.lstrip().startswith("#")]
    return bool(rules) and all(re.match(r"^[^\s:#]*:(allow|deny)\b", l) for l in rules)


def _is_log_line(line: str) -> bool:
    from libtarpit.log import parse_line

    return line.startswith("tarpit-smtpd conn=") or parse_line(line) is not None


def _is_list(content: list[str]) -> bool:
    """Control-list text: one word a line, maybe a # comment after it."""
    entries = [l for l in content if l.strip() and not l.lstrip().startswith("#")]
    return bool(entries) and all(re.fullmatch(r"\s*\S+(\s+#.*)?", l) for l in entries)


def _is_command_or_log(line: str) -> bool:
    return bool(re.match(r"^\s*(\$ |tarpit-smtpd |tarpitctl |tcpserver |\.\.\. |@4000)", line))


def _commands(path: str, first: int, content: list[str]):
    """Yield an Example per command line of a shell-ish block."""
    prompted = any(l.startswith("$ ") for l in content)
    i = 0
    while i < len(content):
        raw, number = content[i], first + i
        i += 1
        if prompted and not raw.startswith("$ "):
            continue
        text = raw[2:] if prompted else raw
        while text.endswith("\\") and i < len(content):  # continuation lines
            text = text[:-1] + " " + content[i].strip()
            i += 1
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        if _is_log_line(text):
            yield Example(path, number, "logline", text)
            continue
        output = []
        k = i
        while prompted and k < len(content) and not content[k].startswith("$ "):
            output.append(content[k])
            k += 1
        expect, failing = None, False
        if prompted and k < len(content) and content[k].strip() == "$ echo $?":
            status = content[k + 1].strip() if k + 1 < len(content) else ""
            expect = int(status) if status.isdigit() else None
        if any(re.search(r"\bexit (\d+)", o) and not re.search(r"\bexit 0\b", o) for o in output):
            failing = True
        if _ours(text):
            yield Example(path, number, "command", text, expect, failing)


def _ours(text: str) -> bool:
    """True when a simple command of the line runs one of our programs (or tcpserver)."""
    if not text.isascii():
        return False  # a diagram (box-drawing characters), not a command line
    try:
        return any(os.path.basename(_substitute(words[0], Path("/"))) in OURS
                   for words, _ in _segments(text))
    except ValueError:  # shlex: no closing quotation
        return False


def examples() -> list[Example]:
    out: list[Example] = []
    for file in doc_files():
        path = str(file.relative_to(ROOT))
        for tag, first, content, context in blocks(file.read_text()):
            body = "\n".join(content)
            if tag == "toml":
                out.append(Example(path, first, "toml", body))
            elif tag == "python":
                out.append(Example(path, first, "python", body))
            elif tag not in SHELL_TAGS:
                continue
            elif _is_tcprules(content):
                out.append(Example(path, first, "tcprules", body))
            elif tag == "" and _is_list(content) and not any(_is_command_or_log(l) for l in content) and \
                    len(named := {n for n in CONTROL_LISTS if f"`{n}`" in context}) == 1:
                out.append(Example(path, first, "control:" + named.pop(), body))
            else:
                out.extend(_commands(path, first, content))
    return out


# --- the fixture every command runs against -----------------------------------------------

def _log_lines() -> list[str]:
    """Log lines of the shapes the wrapper writes, stamped like multilog's, from an hour ago."""
    def line(conn: int, event: str, cls: str = "suspicious", **extra: object) -> str:
        pairs = [("conn", f"c{conn}"), ("pid", 1000 + conn), ("ip", f"192.0.2.{conn}"),
                 ("host", f"p{conn}-2-3.dyn.example.net"), ("class", cls), ("rule", 1),
                 ("event", event), *extra.items()]
        return format_line(pairs)

    events = []
    for conn in range(1, 21):
        events += [line(conn, "connect"), line(conn, "tarpit_start", stage="rcpt", seconds=65.0)]
        if conn % 3:
            events += [line(conn, "tarpit_lost", stage="rcpt", elapsed=float(conn * 3)),
                       line(conn, "end", reason="tarpit_lost", duration=float(conn * 3))]
        else:
            events += [line(conn, "tarpit_done", stage="rcpt", elapsed=65.0),
                       line(conn, "end", reason="backend_closed", duration=66.0)]
    events += [line(30, "connect", "normal"), line(30, "exec", "normal")]
    stamp = time.time() - 3600
    return ["@%016x%08x %s" % ((1 << 62) + 10 + int(stamp) + n, 0, e) for n, e in enumerate(events)]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("docs")
    control = base / "control"
    control.mkdir()
    (control / "me").write_text("mx.example.com\n")
    (control / "rcptusers").write_text("bob@example.com\npostmaster@example.com\n")
    (control / "badheloarg").write_text("localhost\nmx.example.com\n")
    (control / "s25r-allow").write_text(".google.com\n")
    (base / "state").mkdir()
    (base / "textfile").mkdir()
    log = base / "log"
    log.mkdir()
    lines = _log_lines()
    (log / "@400000006553f1000000000a.s").write_text("\n".join(lines[:40]) + "\n")
    (log / "current").write_text("\n".join(lines[40:]) + "\n")
    (base / "tcp.smtp").write_text(':allow\n')
    tcprules = shutil.which("tcprules")
    if tcprules:
        with open(base / "tcp.smtp") as f:
            subprocess.run([tcprules, str(base / "tcp.smtp.cdb"), str(base / "tcp.smtp.tmp")],
                           stdin=f, check=True)
    return base


def _env(base: Path) -> dict[str, str]:
    env = dict(os.environ, TARPIT_CONTROL=str(base / "control"), TARPIT_STATE_DIR=str(base / "state"),
               TARPIT_GREYLIST_URL=str(base / "state" / "greylist.sqlite"))
    env.pop("TARPIT_CONFIG", None)
    return env


def _substitute(word: str, base: Path) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        word = word.replace(placeholder, value)
    for real, mine in sorted(PATHS.items(), key=lambda kv: -len(kv[0])):
        if word == real or word.startswith(real + "/") or word.startswith(real + "."):
            word = str(base / mine) + word[len(real):]
            break
    for prefix in PROGRAMS:
        name = word[len(prefix):]
        if word.startswith(prefix) and name in ("tarpitctl", "tarpit-smtpd", "tarpit-sink", "tcpserver"):
            word = name
    return word


# --- reading a command line -------------------------------------------------------------------

def _segments(text: str) -> list[tuple[list[str], bool]]:
    """The simple commands of a line, each as (words without redirections, reads a pipe)."""
    m = re.match(r"^(?:@\w+|[\d*/,-]+(?:\s+[\d*/,-]+){4})\s+(\S+)\s+(.*)$", text)
    if m:  # a crontab line: time fields, the user in /etc/cron.d lines, the command
        first = m[1]
        runner = first in (*WRAPPERS, *RUNNERS, *OURS) or "/" in first or "=" in first
        text = f"{first} {m[2]}" if runner else m[2]
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = list(lexer)
    out: list[tuple[list[str], bool]] = []
    current: list[str] = []
    piped = False
    skip = False
    for n, w in enumerate(words):
        if skip:
            skip = False
            continue
        if w.isdigit() and n + 1 < len(words) and set(words[n + 1]) <= set("<>&"):
            continue  # the fd number of a redirection: 2>&1, 2>/dev/null
        if w in ("|", "||", "&&", ";", "&"):
            out.append((current, piped))
            current, piped = [], w == "|"
        elif set(w) <= set("<>&"):
            skip = True  # `>` FILE, `>&` 1: drop the target too
        else:
            current.append(w)
    out.append((current, piped))
    unwrapped = [(_unwrap(c), p) for c, p in out]
    return [(c, p) for c, p in unwrapped if c]


def _unwrap(words: list[str]) -> list[str]:
    """Drop what runs a command for another: exec, env VAR=, setuidgid U, runuser -u U --, ..."""
    while words:
        w = words[0]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w) or w in WRAPPERS or w == "env":
            words = words[1:]
        elif w == "setuidgid" or w == "envdir":
            words = words[2:]
        elif w == "runuser" and "--" in words:
            words = words[words.index("--") + 1:]
        elif w == "softlimit":
            words = words[1:]
            while words and words[0].startswith("-"):
                words = words[1 if len(words[0]) > 2 else 2:]
        else:
            break
    return words


def _synopsis(words: list[str]) -> bool:
    return any(w.startswith("[") or w.endswith("]") or w in ("...", "…") or "|" in w for w in words)


def _tarpitctl_parser(sub: str):
    import argparse
    import importlib

    from tarpit_wrappers.tarpitctl import SUBCOMMANDS

    assert sub in SUBCOMMANDS, f"tarpitctl has no subcommand {sub!r} (it has {', '.join(SUBCOMMANDS)})"
    parser = argparse.ArgumentParser(prog=f"tarpitctl {sub}")
    importlib.import_module(f"tarpit_wrappers.ctl_{sub}").add_arguments(parser)
    return parser


def _options_of(parser) -> set[str]:
    import argparse

    out = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out |= set(action.choices)
            for p in action.choices.values():
                out |= _options_of(p)
    return out


def _check_synopsis(words: list[str]) -> None:
    if words[0] == "tarpitctl":
        known = _options_of(_tarpitctl_parser(words[1]))
    else:
        from libtarpit.serveargs import LETTERS

        from tarpit_wrappers.serve import LONG_OPTIONS
        known = {f"-{l}" for l in LETTERS} | {"--" + o.rstrip("=") for o in LONG_OPTIONS}
    for w in words[2:]:
        for part in w.strip("[]").split("|"):
            option = part.split("=")[0]
            if option.startswith("-") and len(option) > 1:
                if words[0] == "tarpitctl":
                    assert option in known, f"{option} is not an option of tarpitctl {words[1]}"
                elif option.startswith("--"):
                    assert option in known, f"{option} is not an option of tarpit-smtpd serve"
                else:
                    assert all(f"-{l}" in known for l in option[1:]), f"{option}: not serve's letters"


def _installed_programs() -> set[str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return set(scripts)


def _check_tcpserver(words: list[str], base: Path) -> None:
    """tcpserver 0.88's command line: options (its getopt letters), host, port, our program."""
    takes = {c: TCPSERVER_OPTS[i + 1:i + 2] == ":" for i, c in enumerate(TCPSERVER_OPTS) if c != ":"}
    rest = words[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-":
        word = rest.pop(0)
        if word == "--":
            break
        i = 1
        while i < len(word):
            letter = word[i]
            i += 1
            assert letter in takes, f"tcpserver has no option -{letter}"
            if takes[letter]:
                if i == len(word):
                    assert rest, f"-{letter} wants an argument"
                    arg = rest.pop(0)
                else:
                    arg = word[i:]
                if letter in "cbugt":
                    assert arg.isdigit(), f"-{letter} {arg}: not a number"
                i = len(word)
    assert len(rest) >= 3, f"tcpserver wants host, port and program: {rest}"
    port, program = rest[1], rest[2]
    assert port.isdigit() or port in ("smtp", "submission"), f"port {port!r}"
    assert os.path.basename(program) in _installed_programs(), \
        f"tcpserver runs {program!r}, which is not one of the programs we install"
    if os.path.basename(program) == "tarpit-smtpd":
        assert len(rest) >= 4 and rest[3], "tarpit-smtpd needs the backend's command line"


def _run(words: list[str], ex: Example, base: Path, stdin: bytes | None) -> None:
    if ex.shown_failing:
        parser = _tarpitctl_parser(words[1])
        parser.parse_args(words[2:])  # SystemExit (usage) fails the test
        return
    done = subprocess.run(words, input=stdin if stdin is not None else b"", capture_output=True,
                          env=_env(base), cwd=base / "control", timeout=120)
    # `tarpitctl s25r`'s 1 is an answer ("a name matched"), not a failure; for the other
    # subcommands 1 means findings (`check`'s warnings), which the fixture must not have
    want = (ex.expect,) if ex.expect is not None else (0, 1) if words[1] == "s25r" else (0,)
    assert done.returncode in want, (
        f"{' '.join(words)} exited {done.returncode}, the docs show {' or '.join(map(str, want))}:\n"
        f"{done.stdout.decode(errors='replace')[-2000:]}{done.stderr.decode(errors='replace')[-2000:]}")


def _shell_text(text: str, base: Path) -> str:
    """`text` with the fixture's paths and programs, for sh -c."""
    for real, mine in sorted(PATHS.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"{re.escape(real)}(?=[/.\s'\"]|$)", str(base / mine), text)
    for prefix in PROGRAMS:
        text = re.sub(rf"{re.escape(prefix)}(tarpitctl|tarpit-smtpd)\b", r"\1", text)
    return text


def check_command(ex: Example, base: Path) -> None:
    segments = _segments(ex.text)
    if len(segments) > 1 and all(w[0] in FILTERS for w, _ in segments[:-1]) \
            and os.path.basename(segments[-1][0][0]) == "tarpitctl" and segments[-1][1]:
        done = subprocess.run(["/bin/sh", "-c", _shell_text(ex.text, base)], capture_output=True,
                              env=_env(base), cwd=base / "control", timeout=120)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        return
    checked = 0
    for words, piped in segments:
        words = [_substitute(w, base) for w in words]
        program = os.path.basename(words[0])
        if program not in ("tarpitctl", "tarpit-smtpd", "tcpserver"):
            continue
        checked += 1
        if program == "tcpserver":
            _check_tcpserver(words, base)
        elif _synopsis(words):
            _check_synopsis(words)
        elif program == "tarpitctl":
            stdin = (base / "log" / "current").read_bytes() if piped else None
            _run(words, ex, base, stdin)
        elif words[1:2] == ["serve"]:
            from libtarpit.serveargs import parse

            from tarpit_wrappers.serve import LONG_OPTIONS
            parse(words[2:], {}, long_options=LONG_OPTIONS)
        elif words[1:2] in (["--help"], ["--version"]):
            _run(words, ex, base, None)
        else:
            assert len(words) >= 2 and words[1], "tarpit-smtpd needs the backend's command line"
    assert checked, f"no command of ours found in {ex.text!r}"


def check_logline(ex: Example) -> None:
    from libtarpit.log import parse_line
    from test_logs_documented import LOGS_MD, sections

    event = parse_line(ex.text)
    assert event is not None, "not a line of ours: libtarpit.log.parse_line refuses it"
    keys = list(event)
    assert keys[:len(LOG_FIELDS)] == LOG_FIELDS, f"fields {keys[:7]}, the order is {LOG_FIELDS}"
    if "mode" in event:
        assert keys[len(LOG_FIELDS)] == "mode", "mode= comes right after event="
    assert event["event"] in sections(LOGS_MD.read_text()), \
        f"event {event['event']} has no section in docs/logs.md"


def check_toml(ex: Example) -> None:
    from libtarpit.config import load_config

    load_config({}, ex.text, ex.id)


def check_tcprules(ex: Example, base: Path) -> None:
    from libtarpit.config import load_config

    tcprules = shutil.which("tcprules")
    if tcprules is None:
        if os.environ.get("TEST_REQUIRE_ALL"):
            pytest.fail("tcprules not installed but TEST_REQUIRE_ALL is set")
        pytest.skip("tcprules not installed (Debian package ucspi-tcp)")
    work = base / re.sub(r"\W", "_", ex.id)
    work.mkdir(exist_ok=True)
    done = subprocess.run([tcprules, str(work / "rules.cdb"), str(work / "rules.tmp")],
                          input=ex.text.encode() + b"\n", capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    for rule in ex.text.splitlines():
        if rule.strip() and not rule.lstrip().startswith("#"):
            env = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="([^"]*)"', rule))
            load_config(env, None)  # a TARPIT_* variable the wrapper would refuse fails here


def check_control(ex: Example, base: Path) -> None:
    name = ex.kind.split(":", 1)[1]
    work = base / re.sub(r"\W", "_", ex.id)
    work.mkdir(exist_ok=True)
    (work / name).write_text(ex.text + "\n")
    if name == "s25r-allow":
        argv = ["tarpitctl", "check", "--control", str(work), "--no-store"]
    else:
        argv = ["tarpitctl", "cdb", str(work / name), "--state-dir", str(base / "state")]
    done = subprocess.run(argv, capture_output=True, env=_env(base), timeout=60)
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0 and name + ":" not in out.replace(f"{work}/{name} ->", ""), out


def check_python(ex: Example) -> None:
    import ast

    try:
        tree = ast.parse(ex.text, ex.id)
    except SyntaxError:  # a signature shown as Python: read only its import lines
        tree = ast.parse("\n".join(l for l in ex.text.splitlines()
                                   if re.match(r"(from \S+ )?import ", l)), ex.id)
    imports = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], [])
    exec(compile(imports, ex.id, "exec"), {})


EXAMPLES = examples()


@pytest.mark.parametrize("ex", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_doc_example(ex: Example, fixture: Path):
    if ex.kind == "command":
        check_command(ex, fixture)
    elif ex.kind == "logline":
        check_logline(ex)
    elif ex.kind == "toml":
        check_toml(ex)
    elif ex.kind == "tcprules":
        check_tcprules(ex, fixture)
    elif ex.kind.startswith("control:"):
        check_control(ex, fixture)
    elif ex.kind == "python":
        check_python(ex)
    else:
        raise AssertionError(ex.kind)


def known_variables() -> set[str]:
    """The TARPIT_* variables something of ours reads: the configuration's, and setup's."""
    from libtarpit import config

    names = {*config.VARIABLES, "TARPIT_CONFIG"}
    for script in (ROOT / "scripts").glob("*.sh"):
        names |= set(re.findall(r"\bTARPIT_[A-Z0-9_]+", script.read_text()))
    return names


def test_every_tarpit_variable_in_an_example_is_one_we_read():
    """A variable in a code block (tcprules, run file, unit, cron) that nothing reads would be
    ignored without a word: the wrapper does not refuse unknown variables."""
    known = known_variables()
    unknown = []
    for file in doc_files():
        for tag, first, content, _ in blocks(file.read_text()):
            for n, text in enumerate(content):
                for name in re.findall(r"\bTARPIT_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_<{])", text):
                    if name not in known:
                        unknown.append(f"{file.relative_to(ROOT)}:{first + n}: {name}")
    assert unknown == [], "\n".join(unknown)


def test_examples_are_found_in_every_kind():
    """If the block reader broke, every parametrized test would pass on nothing."""
    kinds = {e.kind for e in EXAMPLES}
    assert {"command", "logline", "toml", "tcprules", "python"} <= kinds
    assert any(k.startswith("control:") for k in kinds)
    files = {e.path for e in EXAMPLES}
    assert {"README.md", "docs/deployment.md", "docs/stats.md"} <= files


def test_the_checks_fail_on_wrong_examples(fixture):
    """Each kind of check must be able to fail."""
    wrong = [
        Example("x.md", 1, "command", "tarpitctl stats --no-such-option /var/log/qmail/smtpd"),
        Example("x.md", 2, "command", "tarpitctl frobnicate"),
        Example("x.md", 3, "command", "tarpitctl stats [--nope] LOGFILE..."),
        Example("x.md", 4, "command", "tcpserver -vRl0 -Z 0 25 tarpit-smtpd /var/qmail/bin/qmail-smtpd"),
        Example("x.md", 5, "command", "tcpserver -vRl0 0 25 /var/qmail/bin/qmail-smtpd"),
        Example("x.md", 6, "command", "tarpit-smtpd serve -vRl0 -X 0 25 /var/qmail/bin/qmail-smtpd"),
        Example("x.md", 7, "toml", "tarpit = 30\nno_such_knob = 1\n"),
        Example("x.md", 8, "tcprules", '127.:allow,TARPIT_MODE="sometimes"'),
        Example("x.md", 9, "control:rcptusers", "a@b@example.com\n"),
        Example("x.md", 10, "python", "from libtarpit.stats import no_such_name\n"),
        Example("x.md", 11, "logline", "tarpit-smtpd conn=1 pid=1 ip=- host=- rule=- class=- event=end"),
        Example("x.md", 12, "logline", "tarpit-smtpd conn=1 pid=1 ip=- host=- class=- rule=- event=nope"),
        Example("x.md", 13, "command", "printf 'x\\n' | tarpitctl stats --nope -"),
    ]
    from libtarpit.config import ConfigError
    from libtarpit.serveargs import UsageError

    assert "TARPIT_ACTION_HELO_NODOT" in known_variables()
    assert "TARPIT_ACTON_HELO" not in known_variables()
    for ex in wrong:
        with pytest.raises((AssertionError, ConfigError, UsageError, ImportError, SystemExit)):
            test_doc_example(ex, fixture)


def test_commands_are_read_like_the_shell():
    assert _segments("journalctl -u x -o short-iso | tarpitctl stats --since 12h -") == [
        (["journalctl", "-u", "x", "-o", "short-iso"], False),
        (["tarpitctl", "stats", "--since", "12h", "-"], True)]
    assert _segments("17 4 * * *  setuidgid qmaild /usr/local/bin/tarpitctl greylist purge >/dev/null") \
        == [(["/usr/local/bin/tarpitctl", "greylist", "purge"], False)]
    assert _segments("exec 2>&1 envdir ./env softlimit -m 200000000 tarpit-smtpd serve 0 25 x") \
        == [(["tarpit-smtpd", "serve", "0", "25", "x"], False)]
