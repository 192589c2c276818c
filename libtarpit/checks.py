"""The checks a client meets: one shape for every check, their actions applied in one place.

Public names:
  Lists        the control lists the checks consult (badheloarg, rcptusers)
  Check        one check: name, policy key of its action, log event, default action per class,
               whether it needs the proxy for a client, and how it judges
  CHECKS       the registry, in the order the checks are applied within a stage
  ACTIONS      "ignore" | "warn" | "enforce" | "drop"
  Verdict      what a check found: check name, reason token, reply (None: the check holds
               instead of answering, as the tarpit does), log fields
  action_of    the configured action of a check for a policy
  outcome      a verdict's action, by one exhaustive match: "pass", "warn", "enforce", "drop"
  proxy_reasons  the checks that need the proxy for this policy and these lists
  helo         the first HELO/EHLO verdict for an argument, or None
  rcpt         the rcptusers verdict for a recipient, or None
  rcpt_accepted  whether an rcptusers list accepts a recipient (postmaster always)
  greylist_defer  the verdict for a greylist "defer" decision

Postscreen's shape (STYLE.md): every check returns one verdict, declares whether it
needs the proxy, and its action (ignore, warn, enforce, drop) comes from the
configuration and is applied by `outcome`, nowhere else.  A new check is one
`Check` here, its test and a docs line: libtarpit.config takes each check's action
knob (tarpit.toml key, TARPIT_ACTION_<NAME>) and its per-class defaults from
CHECKS, and the exec/proxy choice follows from `proxy_reasons`.

Order within a stage, applied by the session: HELO: badheloarg list, then the shape
rules; RCPT: recipient limit, greylist state, tarpit, rcptusers.  The allow-lists
come first of all: they decide the class before any check runs.

No check here does I/O: the lists are passed in, already loaded.
"""

from __future__ import annotations

from . import smtp
from .values import value

TYPE_CHECKING = False  # typing costs ~4 ms per connection
if TYPE_CHECKING:
    from typing import Any, Callable

ACTIONS = ("ignore", "warn", "enforce", "drop")
LIMIT_KEYS = ("idle_timeout", "error_sleep", "error_soft_limit", "error_hard_limit",
              "recipient_limit", "session_limit", "min_data_rate")


class Lists(value("Lists", "badheloarg rcptusers", defaults=(None, None))):
    """The control lists the checks consult, loaded at admission; None: the list is absent (no check)."""

    __slots__ = ()


class Verdict(value("Verdict", "check reason reply fields", defaults=(None, ()))):
    """A check's finding: `check` name, `reason` token, the `reply` bytes it gives when
    enforced (None when enforcing means holding, as for the tarpit), log `fields`."""

    __slots__ = ()


class Check(value("Check", "name key event defaults proxy")):
    """One check.

    name      its name (the TARPIT_ACTION_<NAME> variable)
    key       the ClassPolicy field and tarpit.toml key holding its action
    event     the log event of its verdicts
    defaults  default action for (trusted, suspicious, normal)
    proxy     (policy, lists) -> True when, with its action on, it needs the proxy
              for this client (a per-command check cannot run on the exec path)
    """

    __slots__ = ()


def _has(name: str) -> Callable[[Any, Any], bool]:
    return lambda policy, lists: getattr(lists, name, None) is not None


def _always(policy: Any, lists: Any) -> bool:
    return True


def _never(policy: Any, lists: Any) -> bool:
    return False


CHECKS: dict[str, Check] = {c.name: c for c in (
    # pregreet runs before exec (greet pause), so it needs no proxy
    Check("pregreet", "pregreet", "pregreet", ("enforce", "enforce", "enforce"), _never),
    Check("helo", "helo", "helo_reject", ("ignore", "enforce", "enforce"), _has("badheloarg")),
    # The no-dot rule applies with or without a badheloarg file, and is off unless turned on:
    # real clients send bare names (Outlook's NetBIOS name, swaks' host name), and turned on
    # for normal clients it routes every one of them through the proxy (`tarpitctl check` says so)
    Check("helo_nodot", "helo_nodot", "helo_reject", ("ignore", "ignore", "ignore"), _always),
    # a public address literal that is not the client's own (seed 003: bots greet with ours);
    # private and loopback literals pass: a client behind NAT can only name those
    Check("helo_literal", "helo_literal", "helo_reject", ("ignore", "enforce", "ignore"), _always),
    Check("rcpt", "rcpt", "rcpt_reject", ("ignore", "enforce", "enforce"), _has("rcptusers")),
    Check("tarpit", "tarpit_action", "tarpit_start", ("enforce", "enforce", "enforce"),
          lambda policy, lists: policy.tarpit > 0),
    Check("greylist", "greylist_action", "greylist_defer", ("enforce", "enforce", "enforce"),
          lambda policy, lists: policy.greylist != "off"),
    # pipelining is seen only during a tarpit, so the tarpit decides the route
    Check("pipelining", "pipelining", "pipelining", ("warn", "warn", "warn"), _never),
)}


def action_of(policy: Any, name: str) -> str:
    """Return the configured action of check `name` under `policy` (KeyError: no such check)."""
    return getattr(policy, CHECKS[name].key)


def outcome(action: str) -> str:
    """Return what a verdict under `action` does: "pass", "warn", "enforce" or "drop".

    The one place actions are applied (postscreen's switch); ValueError for an
    action that is not one of ACTIONS (config rejects those at start).
    """
    match action:
        case "ignore":
            return "pass"
        case "warn":
            return "warn"
        case "enforce":
            return "enforce"
        case "drop":
            return "drop"
        case _:
            raise ValueError(f"unknown action {action!r}")


def proxy_reasons(policy: Any, lists: Any, defaults: Any = None) -> tuple[str, ...]:
    """Return the names of what needs the proxy for this client; () means exec.

    A check needs it when its action is not "ignore" and its `proxy` test holds.
    Besides the checks: hiding PIPELINING, and any protocol limit set away from
    `defaults` (a ClassPolicy of built-in values; the backend enforces none of
    ours, so a limit somebody set must route the client through us).
    """
    out = [c.name for c in CHECKS.values()
           if getattr(policy, c.key) != "ignore" and c.proxy(policy, lists)]
    if policy.hide_pipelining:
        out.append("hide_pipelining")
    if defaults is not None:
        out += [k for k in LIMIT_KEYS if getattr(policy, k) != getattr(defaults, k)]
    return tuple(out)


# --- HELO ----------------------------------------------------------------------


def _is_address_literal(name: str) -> bool:
    if not (name.startswith("[") and name.endswith("]")):
        return False
    import ipaddress

    inner = name[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


HELO_REFUSED = smtp.reply(553, "5.7.1 Sorry, that HELO/EHLO argument is not acceptable")


def _helo_listed(name: str, client_ip: str, lists: Any) -> str | None:
    bad = getattr(lists, "badheloarg", None)
    if bad is not None and (name in bad or name.removesuffix(".") in bad):
        return "listed"
    return None


def _helo_nodot(name: str, client_ip: str, lists: Any) -> str | None:
    if not name:
        return "empty"
    if "." not in name.removesuffix(".") and not _is_address_literal(name):
        return "nodot"
    return None


def _helo_literal(name: str, client_ip: str, lists: Any) -> str | None:
    # seed 003: bots greet with *our* address; a literal must be the client's own
    if not _is_address_literal(name):
        return None
    import ipaddress

    inner = name[1:-1]
    inner = inner[5:] if inner[:5].lower() == "ipv6:" else inner
    try:
        said = ipaddress.ip_address(inner)
    except ValueError:
        return "literal"
    if not said.is_global:
        return None  # a client behind NAT names its private address (Thunderbird does): no lie
    try:
        own = ipaddress.ip_address(client_ip)
    except ValueError:
        return "literal"
    own = (own.ipv4_mapped or own) if own.version == 6 else own
    return None if said == own else "literal"


_HELO_RULES = (("helo", _helo_listed), ("helo_nodot", _helo_nodot), ("helo_literal", _helo_literal))


def helo(arg: str, client_ip: str, lists: Any, policy: Any) -> Verdict | None:
    """Return the first verdict against HELO/EHLO argument `arg`, or None when all accept.

    Checks whose action is "ignore" are skipped.  Reasons: "listed" (in badheloarg,
    case-insensitive, with or without one trailing dot), "empty", "nodot" (no dot,
    not an address literal), "literal" (a public address literal other than `client_ip`).
    Never raises.
    """
    name = arg.strip()
    for check, rule in _HELO_RULES:
        if action_of(policy, check) == "ignore":
            continue
        reason = rule(name, client_ip, lists)
        if reason:
            return Verdict(check, reason, HELO_REFUSED, (("helo", smtp.printable(arg)), ("reason", reason)))
    return None


# --- RCPT ----------------------------------------------------------------------


def rcpt_accepted(address: str, rcptusers: Any) -> bool:
    """Return True when the list `rcptusers` (None: no list) accepts RCPT path `address`.

    "postmaster" at any domain is always accepted (RFC 5321 4.5.1), so a strict
    list cannot lock out abuse reports; the null path "" never is.  Lookup
    order: libtarpit.control.rcpt_candidates.  ControlError when the list's file
    fails under the lookup; never raises for any address text.
    """
    from . import control

    local, domain = control.split_address(address)
    if (local, domain) == ("", ""):
        return False
    if rcptusers is None or local == "postmaster":
        return True
    return any(k in rcptusers for k in control.rcpt_candidates(address))


def rcpt(address: str, lists: Any, policy: Any) -> Verdict | None:
    """Return the rcptusers verdict for RCPT path `address`, or None when accepted.

    No list, or action "ignore": None.  ControlError as for rcpt_accepted.
    """
    users = getattr(lists, "rcptusers", None)
    if users is None or action_of(policy, "rcpt") == "ignore" or rcpt_accepted(address, users):
        return None
    shown = smtp.printable(address)
    return Verdict("rcpt", "unknown_user",
                   smtp.reply(550, f"5.1.1 <{shown}>: Recipient address rejected: no such user"),
                   (("rcpt", shown), ("reason", "unknown_user")))


# --- greylist --------------------------------------------------------------------


def greylist_defer(decision: Any, rcpt: str) -> Verdict:
    """Return the verdict for a greylist "defer" `decision` on recipient `rcpt`.

    The reply text is libtarpit.greylist.defer_text's, the one 450 text.
    """
    from .greylist import defer_text

    shown = smtp.printable(rcpt)
    return Verdict("greylist", decision.reason, smtp.reply(450, f"4.7.1 <{shown}>: " + defer_text(decision)),
                   (("rcpt", shown), ("reason", decision.reason),
                    ("retry_after", round(decision.retry_after or 0))))
