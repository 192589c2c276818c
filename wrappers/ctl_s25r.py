"""tarpitctl s25r: show the S25R verdict for reverse names.

  tarpitctl s25r [--control DIR] [--extra] [--no-allow] [--no-hints] [--explain] NAME...
  tarpitctl s25r [--control DIR] [--extra] [--no-allow] [--no-hints] [--explain] --stdin

One line per name, tab-separated:
  NAME  match  rule=N       suspicious: S25R rule N matched (7: extra pattern)
  NAME  allow  rule=N|-     s25r-allow overrides (rule=- when no rule matched)
  NAME  hint   rule=N  hint=WORD   a mail-server word outranks rule N (1-5): not suspicious
  NAME  nomatch             not suspicious
An empty name or "unknown" means no reverse name (rule 0).  Names are taken
as forward-confirmed, so name entries of the allow-list apply.  --explain adds,
under each line, lines starting with two spaces: what decided and why (the
allow-list entry and its line, the hint, or the rule's pattern and the part of
the name it matched).

Exit: 0 no name suspicious, 1 at least one suspicious, 100 usage,
111 the allow-list exists but cannot be read or parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable

from libtarpit.errors import ControlError
from libtarpit.s25r import AllowList, classify, explain
from libtarpit.text import printable

DEFAULT_CONTROL = "/var/qmail/control"
MAX_NAME = 255  # a DNS name has at most 253 characters: longer ones are cut, with "..."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the s25r options on `parser`."""
    parser.add_argument("--control", metavar="DIR",
                        help="control directory (default: $TARPIT_CONTROL or /var/qmail/control)")
    parser.add_argument("--extra", action="store_true",
                        help="also apply the extra dynamic-name patterns (rule 7)")
    parser.add_argument("--no-allow", action="store_true",
                        help="ignore DIR/s25r-allow")
    parser.add_argument("--no-hints", action="store_true",
                        help="ignore the mail-server hints (with --no-allow: what bare S25R says)")
    parser.add_argument("--explain", action="store_true",
                        help="say under each line which rule, hint or allow-list entry decided, and why")
    parser.add_argument("--stdin", action="store_true", help="read names one per line from stdin")
    parser.add_argument("names", nargs="*", metavar="NAME", help="reverse names to check")


def _escape(name: str) -> str:
    """Return `name` fit for one output field: capped, non-printables, tabs and spaces as '?'."""
    return printable(name, MAX_NAME).replace(" ", "?")  # a space would split the field for awk


def _stdin_names() -> Iterable[str]:
    """Yield the names on stdin, one per line, surrounding whitespace removed."""
    for raw in sys.stdin.buffer:
        yield raw.decode("utf-8", "replace").strip()


def _line(name: str, allow: AllowList | None, args: argparse.Namespace) -> tuple[str, bool]:
    """Return the output for `name` (one line, more with --explain) and whether it is suspicious."""
    hints = not args.no_hints
    if args.explain:
        verdict, why = explain(name, None, allow, extra=args.extra, name_trusted=True, hints=hints)
    else:
        verdict, why = classify(name, None, allow, extra=args.extra, name_trusted=True, hints=hints), []
    rule = "-" if verdict.rule is None else str(verdict.rule)
    if verdict.allowed_by is not None:
        text = f"{_escape(name)}\tallow\trule={rule}"
    elif verdict.hint is not None:
        text = f"{_escape(name)}\thint\trule={rule}\thint={verdict.hint}"
    elif verdict.rule is not None:
        text = f"{_escape(name)}\tmatch\trule={rule}"
    else:
        text = f"{_escape(name)}\tnomatch"
    for sentence in why:
        text += "\n  " + printable(sentence, 4 * MAX_NAME)
    return text, verdict.suspicious


def run(args: argparse.Namespace) -> int:
    """Print one verdict line per name; return the exit status (0, 1, 100, 111)."""
    if args.stdin == bool(args.names):
        print("tarpitctl s25r: give NAME arguments or --stdin (not both)", file=sys.stderr)
        return 100
    from libtarpit.config import ConfigError
    from tarpit_wrappers.settings import read_config

    try:
        cfg, control, _ = read_config(os.environ, args.control)
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        print(f"tarpitctl: {e}", file=sys.stderr)
        return 100
    args.extra = args.extra or cfg.s25r_extra
    allow = None
    if not args.no_allow:
        try:
            allow = AllowList.load(os.path.join(control, "s25r-allow"))
        except ControlError as e:
            print(f"tarpitctl: {e}", file=sys.stderr)
            return 111
    names = _stdin_names() if args.stdin else args.names
    suspicious = False
    try:
        for name in names:
            text, hit = _line(name, allow, args)
            print(text)
            suspicious = suspicious or hit
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader (head, grep -q) left: stop quietly, no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if suspicious else 0
