"""tarpitctl cdb FILE [-o OUT] [-k KIND] [--state-dir DIR]: compile a text control list to CDB.

Prints "FILE -> OUT: N keys" and exits 0.  A line that cannot be parsed
prints "tarpitctl: FILE:LINE: reason" and exits 100 (fix the file); a file
that cannot be read or written exits 111.  The old CDB stays as it was on
any failure.

The new CDB is checked in full here, and recorded as verified in the
wrapper's state directory (--state-dir, else TARPIT_STATE_DIR / tarpit.toml
state_dir as the wrapper reads it), so no connection has to check it again.
A state directory that is missing or not writable is skipped: the first
connection then checks the file once.

Public names: add_arguments, run.
"""

from __future__ import annotations

import argparse
import os
import sys

from libtarpit.control import KINDS, compile_cdb
from libtarpit.errors import ControlError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare FILE, -o OUT, -k KIND and --state-dir DIR."""
    parser.add_argument("file", metavar="FILE", help="the text list, e.g. /var/qmail/control/rcptusers")
    parser.add_argument("-o", "--output", metavar="OUT", help="the CDB to write (default FILE.cdb)")
    parser.add_argument("-k", "--kind", choices=KINDS,
                        help="key rules (default: from the file name, e.g. rcptusers.new -> rcptusers)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the wrapper remembers verified CDBs "
                             "(default: $TARPIT_STATE_DIR or tarpit.toml state_dir)")


def _state_dir(given: str | None) -> str | None:
    """Return the state directory to record the new CDB in, or None when there is none to use."""
    if given:
        return given
    from libtarpit.config import ConfigError
    from tarpit_wrappers.settings import read_config

    try:
        cfg, _, _ = read_config(os.environ)
    except (OSError, UnicodeDecodeError, ConfigError):
        return None  # a broken config must not stop a compile: `tarpitctl check` reports it
    return cfg.state_dir if os.path.isdir(cfg.state_dir) else None


def run(args: argparse.Namespace) -> int:
    """Compile; return 0, 100 (parse error or bad usage) or 111 (I/O error)."""
    out = args.output if args.output is not None else args.file + ".cdb"
    try:
        count = compile_cdb(args.file, out, kind=args.kind, cache_dir=_state_dir(args.state_dir))
    except ValueError as e:
        print(f"tarpitctl: {e}", file=sys.stderr)
        return 100
    except ControlError as e:
        print(f"tarpitctl: {e}", file=sys.stderr)
        return 100 if e.line is not None else 111
    print(f"{args.file} -> {out}: {count} keys")
    return 0
