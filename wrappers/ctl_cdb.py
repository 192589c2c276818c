"""tarpitctl cdb FILE [-o OUT] [-k KIND]: compile a text control list to CDB.

Prints "FILE -> OUT: N keys" and exits 0.  A line that cannot be parsed
prints "tarpitctl: FILE:LINE: reason" and exits 100 (fix the file); a file
that cannot be read or written exits 111.  The old CDB stays as it was on
any failure.
"""

from __future__ import annotations

import argparse
import sys

from libtarpit.control import KINDS, compile_cdb
from libtarpit.errors import ControlError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare FILE, -o OUT and -k KIND."""
    parser.add_argument("file", metavar="FILE", help="the text list, e.g. /var/qmail/control/rcptusers")
    parser.add_argument("-o", "--output", metavar="OUT", help="the CDB to write (default FILE.cdb)")
    parser.add_argument("-k", "--kind", choices=KINDS,
                        help="key rules (default: from the file name, e.g. rcptusers.new -> rcptusers)")


def run(args: argparse.Namespace) -> int:
    """Compile; return 0, 100 (parse error or bad usage) or 111 (I/O error)."""
    out = args.output if args.output is not None else args.file + ".cdb"
    try:
        count = compile_cdb(args.file, out, kind=args.kind)
    except ValueError as e:
        print(f"tarpitctl: {e}", file=sys.stderr)
        return 100
    except ControlError as e:
        print(f"tarpitctl: {e}", file=sys.stderr)
        return 100 if e.line is not None else 111
    print(f"{args.file} -> {out}: {count} keys")
    return 0
