"""The command line of `tarpit-smtpd serve`: tcpserver's options, read as tcpserver reads them.

Public names:
  ServeArgs   the parsed command line (an immutable value; fields below)
  UsageError  a bad command line; str() is the message, USAGE follows it (the caller exits 100)
  USAGE       the one-line usage text
  LETTERS     the tcpserver option letters serve takes, with whether each takes an argument
  parse       argv (without the program and "serve") -> ServeArgs; UsageError

    tarpit-smtpd serve [ -qQvhHpPrRU ] [ -c limit ] [ -x rules.cdb ] [ -B banner ]
                       [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ]
                       [ --long-option[=value] ... ] host port program [ arg ... ]

Letters follow ucspi-tcp 0.88 tcpserver.c main(), parsed the way its sgetopt
does: letters may be bundled (`-vRl0`, `-hp`), an argument may follow its
letter in the same word (`-c100`, `-l0`) or be the next word, options end at
the first word not starting with "-", at "--", or at a lone "-" (which is then
the host); a later letter overrides an earlier one (`-v -q` is quiet).

Where serve is stricter than tcpserver (which reads numbers with scan_ulong,
so `-c x` is 0 and `-c 10x` is 10): numbers must be decimal digits, `-c` at
least 1, ports at most 65535, `-t` at most 3600.  tcpserver's other letters
(-1 -X -d -D -o -O, and -4 -6 -I of the IPv6 forks) are refused with a usage error naming
them.  Long options are serve's own: the caller declares them.
"""

from __future__ import annotations

import os

from libtarpit.values import value

TYPE_CHECKING = False  # typing costs ~4 ms at import
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["LETTERS", "USAGE", "ServeArgs", "UsageError", "parse"]

USAGE = ("usage: tarpit-smtpd serve [ -qQvhHpPrRU ] [ -c limit ] [ -x rules.cdb ] [ -B banner ] "
         "[ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ] [ --option[=value] ... ] "
         "host port program [ arg ... ]")

# letter -> takes an argument (tcpserver's getopt string, less the letters serve refuses)
LETTERS = {"c": True, "x": True, "B": True, "g": True, "u": True, "b": True, "l": True,
           "t": True, "v": False, "q": False, "Q": False, "h": False, "H": False, "p": False, "P": False,
           "r": False, "R": False, "U": False}
_REFUSED = "1XdDoO46I"  # tcpserver's (or its IPv6 forks') letters serve does not implement
_MAX_ID = 2**32 - 2      # (uid_t)-1 means "no change" to setreuid


class ServeArgs(value("ServeArgs",
                      "host port program concurrency rules verbosity remote_host paranoid remote_info "
                      "local_host uid gid backlog banner options timeout",
                      defaults=(40, None, 1, True, False, True, None, None, None, 20, "", (), 26),
                      module=__name__)):
    """A parsed `serve` command line (tcpserver's defaults where an option is absent).

    host         "0" for every address (tcpserver: "" and "0"), else an IPv4 or IPv6
                 literal (without brackets) or a name for the caller to resolve
    port         int, 0-65535 (a service name is resolved through /etc/services)
    program      (PROGRAM, ARG, ...)
    concurrency  -c: connections at once (40)
    rules        -x: the tcprules CDB, None without -x
    verbosity    -q 0, -Q 1 (default), -v 2
    remote_host  -h True (default): look up TCPREMOTEHOST; -H False
    paranoid     -p True: keep the name only when it resolves back to the client; -P False (default)
    remote_info  -r True (tcpserver's default): ask the client's ident server for
                 TCPREMOTEINFO; -R False
    local_host   -l: TCPLOCALHOST as given ("-l0" gives "0"); None: look it up
    uid, gid     -u/-g (or -U from $UID/$GID): drop to them after binding; None
                 (also for 0, as tcpserver calls setuid only when uid is not 0): keep
    backlog      -b: listen() backlog (20)
    banner       -B: bytes written to every client first, as given ("")
    options      ((name, value or None), ...): the declared long options, in order
    timeout      -t: seconds the ident query (-r) may take (26)
    """

    __slots__ = ()


class UsageError(Exception):
    """A bad `serve` command line; str() is one line naming the fault."""


def _number(letter: str, text: str, lowest: int, highest: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"-{letter} needs a decimal number, not {text!r}")
    n = int(text)
    if not lowest <= n <= highest:
        raise UsageError(f"-{letter} {text}: must be from {lowest} to {highest}")
    return n


def _host(text: str) -> str:
    if text in ("", "0"):
        return "0"
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text or text.replace(".", "").isdigit():
        import ipaddress  # once, at start: not on the connection path

        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise UsageError(f"host {text!r} is not an IP address") from None
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(
            0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
            and all(c.isascii() and (c.isalnum() or c in "-_") for c in label) for label in labels):
        raise UsageError(f"host {text!r} is neither an IP address nor a host name")
    return text


def _port(text: str) -> int:
    if text.isascii() and text.isdigit():
        port = int(text)
        if port > 65535:
            raise UsageError(f"port {text} is above 65535")
        return port
    import socket  # once, at start

    try:
        return socket.getservbyname(text, "tcp")
    except (OSError, UnicodeError, ValueError):
        raise UsageError(f"unable to figure out port number for {text!r}") from None


def _long(word: str, rest: list[str], declared: Mapping[str, bool]) -> tuple[str, str | None]:
    """Return (name, value) for `--name[=value]`, taking the value from `rest` when it must."""
    name, eq, val = word[2:].partition("=")
    if name not in declared:
        raise UsageError(f"unknown option --{name}")
    if not declared[name]:
        if eq:
            raise UsageError(f"option --{name} takes no value")
        return name, None
    if not eq:
        if not rest:
            raise UsageError(f"option requires an argument -- {name}")
        val = rest.pop(0)
    return name, val


def parse(argv: Iterable[str], environ: Mapping[str, str] | None = None,
          long_options: Iterable[str] = ()) -> ServeArgs:
    """Return the ServeArgs for `argv`: the words after `serve`.

    `environ` is read by -U ($UID and $GID, each only when set), at its place
    among the options; os.environ when None.  `long_options` declares serve's
    own options: "name" is a flag, "name=" takes a value (`--name=v` or
    `--name v`).  Raises UsageError for an unknown or refused letter, a
    missing argument, a bad number, host or port, or a missing host, port or
    program.
    """
    env = os.environ if environ is None else environ
    declared = {o.rstrip("="): o.endswith("=") for o in long_options}
    words = list(argv)
    got: dict[str, object] = {}
    options = []
    while words and words[0].startswith("-") and words[0] != "-":
        word = words.pop(0)
        if word == "--":
            break
        if word.startswith("--"):
            options.append(_long(word, words, declared))
            continue
        i = 1
        while i < len(word):
            letter = word[i]
            i += 1
            if letter not in LETTERS:
                if letter in _REFUSED:
                    raise UsageError(f"tcpserver's option -{letter} is not supported by serve")
                raise UsageError(f"illegal option -- {letter}")
            arg = None
            if LETTERS[letter]:
                if i < len(word):
                    arg, i = word[i:], len(word)
                elif words:
                    arg = words.pop(0)
                else:
                    raise UsageError(f"option requires an argument -- {letter}")
            _option(letter, arg, got, env)
    if len(words) < 3:
        missing = ("host", "port", "program")[len(words)]
        raise UsageError(f"no {missing} given")
    host, port, *program = words
    if not program[0]:
        raise UsageError("the program is an empty word")
    return ServeArgs(_host(host), _port(port), tuple(program), **got, options=tuple(options))


def _option(letter: str, arg: str | None, got: dict[str, object], env: Mapping[str, str]) -> None:
    """Record one letter's meaning in `got` (a later letter overrides); UsageError for a bad argument."""
    if letter == "c":
        got["concurrency"] = _number("c", arg, 1, 2**31 - 1)
    elif letter == "b":
        got["backlog"] = _number("b", arg, 0, 2**31 - 1)
    elif letter == "t":
        got["timeout"] = _number("t", arg, 0, 3600)
    elif letter == "x":
        if not arg:
            raise UsageError("-x needs a file name")
        got["rules"] = arg
    elif letter == "B":
        got["banner"] = arg
    elif letter == "l":
        got["local_host"] = arg
    elif letter in "ug":
        got["uid" if letter == "u" else "gid"] = _number(letter, arg, 0, _MAX_ID) or None
    elif letter == "U":
        for name, field in (("UID", "uid"), ("GID", "gid")):
            if env.get(name) is not None:
                got[field] = _number(f"U (${name})", env[name], 0, _MAX_ID) or None
    elif letter in "qQv":
        got["verbosity"] = "qQv".index(letter)
    else:  # hH pP rR: the lower case letter turns it on
        field = {"h": "remote_host", "p": "paranoid", "r": "remote_info"}[letter.lower()]
        got[field] = letter.islower()
