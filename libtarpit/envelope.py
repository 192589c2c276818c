"""Strict reading of client command lines: what we check is what every backend executes.

Public names:
  verb_split  bytes line -> (VERB, arg), or None when backends could split it differently
  mail_arg    MAIL argument -> the sender ("" for <>), or None: answer 501 locally
  rcpt_arg    RCPT argument -> the recipient as sent, or None: answer 501 locally
  helo_arg    HELO/EHLO argument -> the name, or None: answer 501 locally
  no_arg      True when an argument-less command (RSET, DATA, QUIT, STARTTLS) has none
  bdat_arg    BDAT argument -> (size, last), or None: answer 501 locally
  NO_ARG_VERBS  the verbs no_arg is for

The rule of the module: a line is accepted only in the one spelling that
qmail-smtpd, exim and aiosmtpd all read the same way, and every function
returns exactly what they read.  Anything else returns None, and the caller
refuses the command itself (501) without forwarding it: a refusal is always
safe, a recipient the backend reads differently from us is a bypass.  Nothing
here raises on client input.

How each backend reads a command line (issue 10; sources read, not copied):

qmail-smtpd (notqmail a7012e4, commands.c `commands`, qmail-smtpd.c):
  - a line ends at LF; one CR before it is dropped, any other CR is data;
    a NUL ends the C string, so the rest of the line is ignored.
  - the verb is everything up to the first SP (not TAB), compared
    case-insensitively with the whole table entry; the argument is the rest
    with leading SPs skipped.  No length limit.
  - `addrparse` (MAIL and RCPT): the address starts after the FIRST `<`
    anywhere in the argument and ends at the first unquoted `>` or at the end
    of the line (no `>` needed, no `FROM:`/`TO:` needed: `RCPT x <a@b` is
    a@b).  Without `<` it is the text after the first `:` (or nothing) up to
    a SP.  A leading `@` drops everything up to the first `:` (source route).
    Double quotes are removed and `\\x` becomes x.  Longer than 900: 555.
  - `smtp_mail` never refuses a second MAIL: it replaces the sender and
    empties the recipients.  `smtp_rset`, `smtp_data`, `smtp_quit` ignore any
    argument; `smtp_helo`/`smtp_ehlo` accept anything (even nothing) and end
    the transaction.  No BDAT (502).

exim 4.9x (src/smtp_in.c `smtp_read_command`, src/parse.c):
  - a line ends at LF, then ALL trailing white space (isspace: SP, TAB, CR,
    VT, FF) is dropped; any NUL makes the whole line a 500 (BADCHAR_CMD).
    A line over 16384 bytes is an unknown command and its tail is read as
    the next command.
  - the verb is a case-insensitive prefix match against "mail from:",
    "rcpt to:", "rset", "data", ...; the name must be followed by SP or the
    end (exactly one SP in "mail from:"/"rcpt to:"); white space after it is
    skipped.  RSET, DATA, QUIT, STARTTLS with an argument: 501 (BADARG_CMD),
    nothing is reset.
  - MAIL/RCPT: ESMTP options are taken off the END (`extract_option`), then
    `parse_extract_address` reads an RFC 822 mailbox: comments (...) are
    skipped, a phrase before `<` is allowed (`RCPT TO:bob <x@y>` is x@y),
    `>` is required, a source route `@a,@b:` is dropped, quotes are kept.
  - a second MAIL: 503.  HELO/EHLO with an argument that is not a host name
    or address literal (`check_helo`): 501 and the transaction stays.
  - BDAT: `sscanf("%u")`: sign and leading blanks allowed, the value wraps
    modulo 2**32 (4294967296 is 0) and the chunk counter is an int.

aiosmtpd 1.4 (aiosmtpd/smtp.py `_handle_client`, `_getaddr`):
  - a line ends at LF; ALL trailing CR and LF are dropped; the verb is
    split at the first SP and upper-cased; the argument is stripped of
    white space on both sides; a non-ASCII argument is a 500.
  - MAIL/RCPT: `_strip_command_keyword` wants "FROM:"/"TO:" (any case) then
    strips; `_getaddr` uses the email header parser: a missing `>` is
    accepted, comments and quotes are removed, a source route is dropped,
    `<>` as a recipient is the address "<>".
  - a second MAIL: 503.  RSET/DATA/QUIT with an argument: 501.  HELO with
    no argument: 501.  No BDAT (500).

So we accept, after `verb_split`: `FROM:<addr>` / `TO:<addr>` (one optional
SP after the colon) with `addr` a dot-atom local part (RFC 5321 atext, no
quotes, no backslash, no comments) `@` a host name of letter-digit-hyphen
labels, optionally preceded by a source route `@host,@host:` which all three
drop; then optional ` KEYWORD[=value]` parameters with no `<`, `>`, quotes,
backslash or parentheses.  Domain literals are refused (qmail rewrites them
through control/localiphost).  `<Postmaster>` without a domain is accepted
for RCPT (RFC 5321 4.1.1.3).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

NO_ARG_VERBS = frozenset({"RSET", "DATA", "QUIT", "STARTTLS"})
MAX_LOCAL = 64      # RFC 5321 4.5.3.1.1
MAX_PATH = 254      # RFC 5321 4.5.3.1.3 less the brackets
MAX_DOMAIN = 255
MAX_VERB = 16
BDAT_LIMIT = 2**31 - 1  # exim counts chunk bytes in an int

# Plain sets, not regular expressions: compiling them cost ~2 ms per connection.
_DIGITS = frozenset("0123456789")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_ATEXT = _LDH | frozenset("!#$%&'*+/=?^_`{|}~")          # RFC 5321 atext
_KEYWORD = _LDH                                            # esmtp-keyword
_VALUE = frozenset(chr(c) for c in range(0x21, 0x7F)) - frozenset(' =<>"\\()')  # esmtp-value, narrowed
_CONTROL = bytes(range(0x20)) + b"\x7f"


def verb_split(line: bytes) -> tuple[str, str] | None:
    """Return (VERB upper-cased, argument) for a command line, or None.

    `line` may end in CRLF, LF or nothing.  The verb is the ASCII letters
    before the first SP (qmail, exim and aiosmtpd all split there); the
    argument is everything after that SP, decoded as latin-1 so the caller
    sees every byte, not stripped (a second SP stays: exim would not know
    the command).  None when the line holds a NUL (qmail truncates, exim
    refuses), a CR other than the one before LF (qmail keeps it, exim and
    aiosmtpd strip trailing ones), a TAB or any other control character
    (only exim takes TAB as a separator), or when the verb is empty, not
    letters or longer than 16.  Never raises.
    """
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    if len(line.translate(None, _CONTROL)) != len(line):
        return None
    verb, _, arg = line.partition(b" ")
    if not (0 < len(verb) <= MAX_VERB and verb.isalpha()):  # bytes.isalpha is ASCII only
        return None
    return verb.decode("ascii").upper(), arg.decode("latin-1")


def _dot_atom(text: str, chars: frozenset[str]) -> bool:
    """True when `text` is words of `chars` joined by single dots."""
    return all(word and chars.issuperset(word) for word in text.split("."))


def _domain(text: str) -> bool:
    """True for a host name: dot-separated letter-digit-hyphen labels, no hyphen at either end."""
    if not 0 < len(text) <= MAX_DOMAIN:
        return False
    return all(0 < len(label) <= 63 and _LDH.issuperset(label) and label[0] != "-" and label[-1] != "-"
               for label in text.split("."))


def _params(text: str) -> bool:
    """True when `text` is "" or SP-led `KEYWORD[=value]` items, one SP apart."""
    if not text:
        return True
    if text[0] != " ":
        return False
    for item in text[1:].split(" "):
        key, eq, value = item.partition("=")
        if not key or not _KEYWORD.issuperset(key) or key[0] == "-":
            return False
        if eq and not (value and _VALUE.issuperset(value)):
            return False
    return True


def _path(arg: str, keyword: str) -> tuple[str, str] | None:
    """(inside of the brackets, parameters) of `keyword` SP? `<...>` params, or None."""
    n = len(keyword)
    if arg[:n].upper() != keyword:
        return None
    rest = arg[n:].rstrip(" ")
    if rest[:2] == " <":
        rest = rest[1:]
    if rest[:1] != "<":
        return None
    end = rest.find(">")
    if end < 0 or not _params(rest[end + 1:]):
        return None
    return rest[1:end], rest[end + 1:]


def _mailbox(inside: str) -> str | None:
    """The address of `[route] local@domain` (route dropped), or None."""
    if inside[:1] == "@":
        route, colon, inside = inside.partition(":")
        if not colon or not all(hop[:1] == "@" and _domain(hop[1:]) for hop in route.split(",")):
            return None
    local, at, domain = inside.partition("@")
    if (not at or len(inside) > MAX_PATH or len(local) > MAX_LOCAL
            or not _dot_atom(local, _ATEXT) or not _domain(domain)):
        return None
    return inside


def mail_arg(arg: str) -> str | None:
    """Return the sender of a MAIL argument (the text after "MAIL "), or None.

    "FROM:<a@b.c> SIZE=10" -> "a@b.c"; "FROM:<>" -> "" (the null path);
    "FROM:<@r.s:a@b.c>" -> "a@b.c" (every backend drops a source route).
    None means: answer 501 and do not forward (no "FROM:", no brackets, a
    phrase, a second `<`, quotes, a domain literal, an unqualified address,
    a bad parameter, more than one SP anywhere ...).  Never raises.
    """
    path = _path(arg, "FROM:")
    if path is None:
        return None
    if path[0] == "":
        return ""
    return _mailbox(path[0])


def rcpt_arg(arg: str) -> str | None:
    """Return the recipient of a RCPT argument (the text after "RCPT "), or None.

    "TO:<bob@example.com> NOTIFY=NEVER" -> "bob@example.com", as sent (the
    caller folds case); "TO:<@r.s:bob@b.c>" -> "bob@b.c" (what qmail queues);
    "TO:<Postmaster>" -> "Postmaster".  None means: answer 501 and do not
    forward: for every argument qmail-smtpd, exim or aiosmtpd reads as a
    recipient X, this returns X or None, never anything else.  Never raises.
    """
    path = _path(arg, "TO:")
    if path is None:
        return None
    if path[0].lower() == "postmaster":
        return path[0]
    return _mailbox(path[0])


def helo_arg(arg: str) -> str | None:
    """Return the name of a HELO/EHLO argument (a host name or address literal), or None.

    None (answer 501, do not forward) for an empty argument or anything exim's
    `check_helo` refuses: qmail-smtpd would end the transaction on it while
    exim keeps it.  Never raises.
    """
    name = arg.rstrip(" ")
    if _domain(name):
        return name
    if len(name) > 2 and name[0] == "[" and name[-1] == "]":
        import ipaddress  # only for the rare address literal: ~1 ms

        text, version = name[1:-1], 4
        if text[:5].lower() == "ipv6:":
            text, version = text[5:], 6
        try:
            if ipaddress.ip_address(text).version == version:
                return name
        except ValueError:
            return None
    return None


def no_arg(arg: str) -> bool:
    """True when `arg` (after the verb) is empty or only SPs.

    For the verbs in NO_ARG_VERBS (RSET, DATA, QUIT, STARTTLS): exim and
    aiosmtpd answer 501 to them with an argument and do nothing, while
    qmail-smtpd ignores the argument and acts, so the caller refuses them
    locally when this is False.  NOOP, HELP and VRFY take an optional
    argument (RFC 5321 4.1.1.9) and change no state.
    """
    return arg.strip(" ") == ""


def bdat_arg(arg: str, max_size: int) -> tuple[int, bool] | None:
    """Return (size, last) for "SIZE" or "SIZE LAST", or None.

    SIZE is 1 to 10 ASCII digits, at most `max_size` and below 2**31 (exim
    wraps larger values); one SP before LAST (any case).  A zero size is
    accepted only with LAST (exim refuses an empty non-last chunk).  None for
    anything else: a sign, blanks, a TAB, trailing text.  Never raises.
    """
    size, sp, last = arg.rstrip(" ").partition(" ")
    if sp and last.upper() != "LAST":
        return None
    if not (0 < len(size) <= 10 and _DIGITS.issuperset(size)):
        return None
    n = int(size)
    if n > min(max_size, BDAT_LIMIT) or (n == 0 and not sp):
        return None
    return n, bool(sp)
