"""--help and --version for every program, answered the same way (exit 0), before anything else runs.

    about(argv, prog, usage, summary) -> exit status or None

Returns 0 after printing the usage and `summary` for -h/--help, or the version for
--version, when that is the only argument; None otherwise (the program goes on).
"""

from __future__ import annotations

import sys


def about(argv: list[str], prog: str, usage: str, summary: str) -> int | None:
    """Answer `prog --help` / `prog --version` on stdout; None when argv asks for neither."""
    if len(argv) != 1 or argv[0] not in ("-h", "--help", "--version"):
        return None
    if argv[0] == "--version":
        from libtarpit import __version__

        sys.stdout.write(f"{prog} {__version__}\n")
    else:
        sys.stdout.write(usage.rstrip("\n") + "\n\n" + summary.rstrip("\n") + "\n"
                         "Documentation: docs/ in the source tree, README.md to start.\n")
    sys.stdout.flush()
    return 0
