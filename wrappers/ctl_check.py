"""tarpitctl check: validate configuration and control files, show what each class gets.

Reads the same sources the wrapper reads (environment, tarpit.toml, control
directory), so running it with the environment of the tcpserver run file
shows what clients will get.  Exit 0 when all is well, 1 when there are
warnings, 100 for a configuration error, 111 when a control list or the
greylist store cannot be read (the wrapper would answer 451 / fail open).
"""

from __future__ import annotations

import argparse
import os
import sys

LISTS = ("s25r-allow", "badheloarg", "rcptusers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `tarpitctl check`."""
    parser.add_argument("--control", help="control directory (default $TARPIT_CONTROL or /var/qmail/control)")
    parser.add_argument("--config", help="tarpit.toml (default $TARPIT_CONFIG or CONTROL/tarpit.toml)")
    parser.add_argument("--no-store", action="store_true", help="do not try the greylist store")
    parser.add_argument("--user", help="try the store as this user, the one the wrapper runs as "
                        "(default: the owner of the state directory; needs root to switch)")
    parser.add_argument("--tcpserver", metavar="OPTIONS",
                        help="the tcpserver options of your run file (e.g. '-vRHl0') to check for -H and -p")


def run(args: argparse.Namespace) -> int:
    """Print the report; return the exit status described in the module docstring."""
    from libtarpit.config import CLASSES, ConfigError

    from tarpit_wrappers.settings import read_config

    env = dict(os.environ)
    try:
        cfg, control, cfg_path = read_config(env, args.control, args.config)
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        print(f"tarpitctl: {e}", file=sys.stderr)
        return 100
    print(f"configuration  {cfg_path or '(built-in defaults, no tarpit.toml)'}; mode={cfg.mode}")
    warnings, broken = 0, 0
    if not os.path.isdir(control):
        print(f"WARNING  control directory {control} does not exist: every client would get 451")
        warnings += 1
    from libtarpit.config import unknown_variables

    for name in unknown_variables(env):  # the wrapper ignores them, with an error line per connection
        print(f"WARNING  {name} is not a variable tarpit-smtpd reads (a typo?): it would be ignored")
        warnings += 1
    present = {}
    for name in LISTS:
        state, ok, warn = describe_list(control, name)
        present[name] = ok
        broken += state.startswith("ERROR")
        warnings += warn
        print(f"list {name:<11} {state}")
    warnings += check_tcpserver(args.tcpserver, cfg.rdns)
    if cfg.dnswl_zone:
        warnings += check_dnswl(cfg)
    if cfg.tls_cert:
        broken += check_certificate(cfg.tls_cert, cfg.tls_key or None)
    for cls in CLASSES:
        print(describe_class(cls, cfg.policy(cls), present))
    if any(cfg.policy(c).greylist != "off" for c in CLASSES) and not args.no_store:
        broken += check_store(cfg, args.user)
    if broken:
        return 111
    return 1 if warnings else 0


def check_certificate(cert: str, key: str | None) -> int:
    """Print the TLS certificate's subject and expiry; return 1 if it cannot be used."""
    import time

    from libtarpit.errors import ControlError
    from libtarpit.tls import describe, load_context

    try:
        load_context(cert, key)
        subject, expires = describe(cert)
    except ControlError as e:
        print(f"tls      ERROR {e} (clients asking for STARTTLS would be refused)")
        return 1
    days = (expires - time.time()) / 86400
    when = time.strftime("%Y-%m-%d", time.gmtime(expires))
    note = "  WARNING: expired" if days < 0 else ("  WARNING: expires within 14 days" if days < 14 else "")
    print(f"tls      STARTTLS terminated here: {subject}, expires {when} ({days:.0f} days){note}")
    return 0


def check_tcpserver(options: str | None, rdns: bool) -> int:
    """Print what the tcpserver flags mean for S25R; return the number of warnings."""
    flags = "".join(w[1:] for w in (options or "").split() if w.startswith("-") and not w.startswith("--"))
    if options is None:
        print("note     tcpserver must look names up (-h, the default) for S25R; under -H every client\n"
              "         looks like rule 0 unless TARPIT_RDNS=1. Pass --tcpserver '<options>' to check.")
        return 0
    warn = 0
    if "H" in flags.split("h")[-1] and not rdns:
        print("WARNING  tcpserver -H: no reverse lookups, so every client looks like S25R rule 0 (no name).\n"
              "         Use -hp, or set TARPIT_RDNS=1 so tarpit-smtpd looks names up itself.")
        warn += 1
    if "p" not in flags.split("P")[-1] and not rdns:
        print("WARNING  tcpserver without -p: reverse names are not forward-confirmed, so anyone who controls\n"
              "         an IP's PTR can claim an allow-listed name such as mail-x.google.com. Use -hp.")
        warn += 1
    return warn


def check_dnswl(cfg) -> int:
    """Ask the DNSWL zone about its test entry 127.0.0.2 (RFC 5782); print the answer; return the warnings.

    One query, as the wrapper makes it (same zone, server and timeout).  A zone that does not
    answer, refuses us or does not list its test entry trusts nobody: a warning, not an error,
    since the wrapper then treats every client as if DNSWL were off.
    """
    from libtarpit.dnswl import BLOCKED, lookup_for

    zone = cfg.dnswl_zone
    where = f" at {cfg.dnswl_server}" if cfg.dnswl_server else ""
    r = lookup_for(cfg, "127.0.0.2")
    if r.listed:
        print(f"dnswl    {zone} answers: test entry 127.0.0.2 listed as {r.answer} (level {r.level}); "
              f"suspicious clients listed at level {cfg.dnswl_min_level} or more are trusted")
        return 0
    if r.error == BLOCKED:
        print(f"WARNING  dnswl {zone}: blocked (it answered {r.answer}): the zone refuses this resolver{where}\n"
              "         (a public or shared resolver, or too many queries); nobody would be trusted.\n"
              "         Query it through a resolver of your own.")
    elif r.error is not None:
        print(f"WARNING  dnswl {zone}: {r.error} within {cfg.dnswl_timeout:g} s{where}; every query would log\n"
              "         event=error what=dnswl and suspicious clients would stay suspicious.")
    else:
        print(f"WARNING  dnswl {zone}: the test entry 127.0.0.2 is not listed (RFC 5782 asks every list\n"
              "         to list it): is this the zone you mean?")
    return 1


def describe_list(control: str, name: str) -> tuple[str, bool, int]:
    """Return (text, present, warnings) for one control list."""
    from libtarpit.errors import ControlError

    path = os.path.join(control, name)
    try:
        if name == "s25r-allow":
            from libtarpit.s25r import AllowList

            if not os.path.exists(path):
                return "absent: S25R without allow-list (big senders may be tarpitted)", False, 1
            return f"{len(AllowList.load(path))} entries ({path})", True, 0
        from libtarpit.control import ControlList, stale_cdb

        lst = ControlList.load(control, name)
        if lst is None:
            return "absent: no check", False, 0
        stale = stale_cdb(control, name)
        note = "  WARNING: the text file is newer than the .cdb: run tarpitctl cdb" if stale else ""
        return f"{len(lst)} keys ({lst.path}){note}", True, int(bool(stale))
    except ControlError as e:
        return f"ERROR {e} (clients would get 451)", False, 0


def describe_class(cls: str, pol, present: dict[str, bool]) -> str:
    """One paragraph: what a client of class `cls` gets, and why it is proxied or exec'd.

    The route comes from libtarpit.checks.proxy_reasons, the function the wrapper's
    admission uses, so what this prints is what the wrapper does.
    """
    from libtarpit.checks import CHECKS, proxy_reasons
    from libtarpit.config import BUILTIN
    from libtarpit.session import Lists

    lists = Lists(True if present["badheloarg"] else None, True if present["rcptusers"] else None)
    why = proxy_reasons(pol, lists, BUILTIN)
    parts = [f"greet pause {pol.greet_pause:g} s"]
    if pol.tarpit > 0 and pol.tarpit_action != "ignore":
        parts.append(f"tarpit {pol.tarpit:g} s at {pol.tarpit_stage.upper()} ({pol.tarpit_action})")
    parts.append(f"greylist {pol.greylist}")
    helo = pol.helo != "ignore" and present["badheloarg"]
    rcpt = pol.rcpt != "ignore" and present["rcptusers"]
    parts.append(f"badheloarg {'on (' + pol.helo + ')' if helo else 'off'}")
    parts.append(f"rcptusers {'on (' + pol.rcpt + ')' if rcpt else 'off'}")
    shape = [c.name for c in CHECKS.values() if c.name.startswith("helo_") and getattr(pol, c.key) != "ignore"]
    if shape:
        parts.append("HELO rules " + ", ".join(f"{n} ({getattr(pol, CHECKS[n].key)})" for n in shape))
    if why:
        parts.append(f"idle timeout {pol.idle_timeout:g} s, errors sleep {pol.error_sleep:g} s after "
                     f"{pol.error_soft_limit}, drop at {pol.error_hard_limit}, "
                     f"{pol.recipient_limit} recipients, PIPELINING {'hidden' if pol.hide_pipelining else 'kept'}")
        path = "proxy (relayed through tarpit-smtpd) for: " + ", ".join(why)
    else:
        path = "exec fast path (no process of ours stays)"
        parts.append("protocol limits at their defaults do not apply here (the backend's own apply)")
    return f"class {cls:<10} {path}\n    " + "; ".join(parts)


def store_user(cfg, name: str | None) -> tuple[int, int, str]:
    """(uid, gid, name) the store is tried as: --user, else the state directory's owner, else ourselves."""
    import pwd

    if name:
        pw = pwd.getpwnam(name)
        return pw.pw_uid, pw.pw_gid, name
    try:
        st = os.stat(cfg.state_dir)
        uid, gid = st.st_uid, st.st_gid
    except OSError:
        uid, gid = os.geteuid(), os.getegid()
    try:
        return uid, gid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, gid, str(uid)


def _probe(cfg) -> tuple[int, str]:
    """Read the store and write to it (purge: it deletes only expired records); (0 ok | 1, text)."""
    import time

    from libtarpit import greylist
    from libtarpit.errors import StoreError

    try:
        store = greylist.open_store(cfg.greylist_url, timeout=cfg.greylist_timeout)
        n = len(store.records(time.time()))
        store.purge(time.time())
        return 0, f"reachable and writable, {n} records"
    except StoreError as e:
        return 1, f"ERROR {e} (the wrapper fails open: mail passes, taRgrey is off)"


def check_store(cfg, user: str | None = None) -> int:
    """Try the greylist store as the wrapper's user; print the result; return 1 if it failed.

    As root, the probe runs in a child that has become that user, so a store file it
    creates belongs to the wrapper, and a file the wrapper could not write is reported
    (a root-owned greylist.sqlite used to pass here and fail for every connection).
    """
    try:
        uid, gid, name = store_user(cfg, user)
    except KeyError:
        print(f"greylist store {cfg.greylist_url}: ERROR no user {user!r}")
        return 1
    if os.geteuid() != 0 or uid == os.geteuid():
        code, text = _probe(cfg)
    else:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become the wrapper's user, try, report through the pipe
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                code, text = _probe(cfg)
            except BaseException as e:  # noqa: BLE001 - whatever it is, the parent reports it
                code, text = 1, f"ERROR {type(e).__name__}: {e}"
            os.write(w, f"{code}{text}".encode())
            os._exit(0)
        os.close(w)
        out = b""
        while chunk := os.read(r, 4096):
            out += chunk
        os.close(r)
        os.waitpid(pid, 0)
        reply = out.decode(errors="replace") or "1ERROR the probe died"
        code, text = int(reply[0]), reply[1:]
    print(f"greylist store {cfg.greylist_url} as {name}: {text}")
    return code
