"""tarpitctl greylist: list, purge, whitelist-add and delete taRgrey records.

  tarpitctl greylist [--store URL|PATH] [--timeout S] list [--all]
  tarpitctl greylist [--store URL|PATH] purge
  tarpitctl greylist [--store URL|PATH] whitelist-add CLIENT [--seconds N]
  tarpitctl greylist [--store URL|PATH] delete CLIENT [SENDER RCPT]

The store defaults to $TARPIT_GREYLIST_URL, else greylist_url in tarpit.toml, else DEFAULT_STORE.
A bare IP given as CLIENT becomes the key the wrapper would use for a suspicious client:
libtarpit.greylist.params_for(config, "suspicious") names the network sizes and key mode
(tarpit.toml greylist_ipv4_prefix, greylist_ipv6_prefix, greylist_key and their
environment variables); --ipv4-prefix and --ipv6-prefix override them only when given.
`list` prints one record a line, tab-separated: kind, client, sender, rcpt, first seen, last seen, count, expires
(times in UTC, ISO 8601).  Exit codes: 0 ok, 1 nothing to delete, 100 usage, 111 store error.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from datetime import datetime, timezone

from libtarpit.errors import StoreError
from libtarpit.text import printable
from libtarpit.greylist import (
    Greylist,
    GreylistParams,
    Record,
    client_key,
    normalize_address,
    open_store,
    params_for,
)

DEFAULT_STORE = "/var/lib/tarpit-smtpd/greylist.sqlite"
DEFAULT_WHITELIST_SECONDS = 35 * 86400
MAX_FIELD = 512  # records hold at most 256 characters (greylist.MAX_ADDRESS); keys are shorter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options and actions of `tarpitctl greylist`."""
    parser.add_argument("--store", metavar="URL|PATH", help="redis://... or a SQLite file "
                        f"(default: $TARPIT_GREYLIST_URL, tarpit.toml greylist_url, else {DEFAULT_STORE})")
    parser.add_argument("--timeout", type=float, default=5.0, help="store timeout in seconds (default 5)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="print the records, one a line")
    ls.add_argument("--all", action="store_true", help="include expired records not yet purged")
    sub.add_parser("purge", help="delete expired records, print how many")
    wl = sub.add_parser("whitelist-add", help="whitelist a client (IP, network or name key)")
    wl.add_argument("client")
    wl.add_argument("--seconds", type=float, default=DEFAULT_WHITELIST_SECONDS,
                    help=f"how long (default {DEFAULT_WHITELIST_SECONDS}, 35 days)")
    de = sub.add_parser("delete", help="delete a client's records, or one triple")
    de.add_argument("client")
    for p in (wl, de):
        p.add_argument("--ipv4-prefix", type=int, help="network of a bare IPv4 address "
                       "(default: greylist_ipv4_prefix of the configuration, 24)")
        p.add_argument("--ipv6-prefix", type=int, help="network of a bare IPv6 address "
                       "(default: greylist_ipv6_prefix of the configuration, 64)")
    de.add_argument("triple", nargs="*", metavar="SENDER RCPT", help="only this triple (<> is the null sender)")


def run(args: argparse.Namespace) -> int:
    """Run one action; return the exit status (0, 1, 100 or 111)."""
    from libtarpit.config import ConfigError
    from tarpit_wrappers.settings import read_config

    try:
        cfg = read_config(os.environ)[0]  # $TARPIT_*, tarpit.toml, defaults: what the wrapper reads
        args.params = _key_params(cfg, args)
    except (OSError, UnicodeDecodeError, ConfigError, ValueError) as e:
        print(f"tarpitctl: {e}", file=sys.stderr)
        return 100
    url = args.store or cfg.greylist_url
    if args.action == "delete" and len(args.triple) not in (0, 2):
        print("tarpitctl greylist: delete takes CLIENT or CLIENT SENDER RCPT", file=sys.stderr)
        return 100
    try:
        store = open_store(url, timeout=args.timeout)
        try:
            return _ACTIONS[args.action](store, args, time.time())
        finally:
            store.close()
    except StoreError as e:
        print(f"tarpitctl greylist: store error: {e}", file=sys.stderr)
        return 111
    except ValueError as e:
        print(f"tarpitctl greylist: {e}", file=sys.stderr)
        return 100


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _field(text: str) -> str:
    # tab-separated output: a space or tab inside a field would split it
    return printable(text, MAX_FIELD).replace(" ", "?")


def format_record(rec: Record) -> str:
    """Return one `list` line for a record (tab-separated, no newline)."""
    if rec.kind in ("grey", "pass"):
        sender, rcpt = _field(rec.sender) or "<>", _field(rec.rcpt) or "<>"
    else:
        sender = rcpt = "-"
    times = [_iso(rec.first), _iso(rec.last), str(rec.count), _iso(rec.until)]
    return "\t".join([rec.kind, _field(rec.client), sender, rcpt, *times])


def _list(store, args: argparse.Namespace, now: float) -> int:
    for rec in store.records(None if args.all else now):
        print(format_record(rec))
    return 0


def _purge(store, args: argparse.Namespace, now: float) -> int:
    print(store.purge(now))
    return 0


def _key_params(cfg, args: argparse.Namespace) -> GreylistParams:
    """The wrapper's parameters for a suspicious client, prefixes overridden by the options given.

    Raises ValueError for a prefix out of range.
    """
    params = params_for(cfg, "suspicious") or params_for(cfg, "suspicious", mode="targrey")
    for name in ("ipv4_prefix", "ipv6_prefix"):
        given = getattr(args, name, None)
        if given is not None:
            params = GreylistParams(**{**params._asdict(), name: given})  # checked again
    return params


def _key(client: str, params: GreylistParams) -> str:
    """A bare IP becomes its network key, as the wrapper builds it; anything else is kept."""
    try:
        ipaddress.ip_address(client)
    except ValueError:
        return client.strip().lower()
    return client_key(client, None, params)


def _whitelist_add(store, args: argparse.Namespace, now: float) -> int:
    key = _key(args.client, args.params)
    rec = Greylist(store, args.params).whitelist_add(key, args.seconds, now)
    print(f"whitelisted\t{_field(key)}\tuntil\t{_iso(rec.until)}")
    return 0


def _delete(store, args: argparse.Namespace, now: float) -> int:
    key = _key(args.client, args.params)
    sender = rcpt = None
    if args.triple:
        sender, rcpt = (normalize_address("" if a == "<>" else a) for a in args.triple)
    n = store.delete(key, sender, rcpt)
    print(f"deleted {n}")
    return 0 if n else 1


_ACTIONS = {"list": _list, "purge": _purge, "whitelist-add": _whitelist_add, "delete": _delete}
