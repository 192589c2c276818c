"""tarpitctl: administration of tarpit-smtpd.

Each subcommand lives in its own module `tarpit_wrappers.ctl_<name>` with two
functions, `add_arguments(parser)` and `run(args) -> int`, imported only when
that subcommand runs so `tarpitctl s25r` does not pay for `stats`.

Exit codes follow qmail: 0 ok, 1 "no"/findings, 100 usage or permanent error,
111 temporary error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "cdb": "compile a text control list to CDB (atomic)",
    "s25r": "show the S25R verdict for reverse names",
    "stats": "give-up table, funnel, s25r-allow candidates or Prometheus counters from tarpit-smtpd logs",
    "greylist": "list, purge, whitelist-add, delete greylist records",
    "check": "validate configuration and control files",
}


def main(argv: list[str] | None = None) -> int:
    """Run tarpitctl; return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:
        from tarpit_wrappers.about import about

        return about(argv, "tarpitctl", "", "") or 0
    parser = argparse.ArgumentParser(prog="tarpitctl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        parser.print_usage(sys.stderr)
        print("tarpitctl: choose one of: " + ", ".join(SUBCOMMANDS), file=sys.stderr)
        return 100
    name = argv[0]
    module = importlib.import_module(f"tarpit_wrappers.ctl_{name}")
    sp = argparse.ArgumentParser(prog=f"tarpitctl {name}", description=SUBCOMMANDS[name])
    module.add_arguments(sp)
    try:
        args = sp.parse_args(argv[1:])
    except SystemExit as e:
        return 100 if e.code else 0
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
