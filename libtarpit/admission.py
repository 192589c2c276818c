"""Admission: who is connecting, what they get, and what happens first. One step, both drivers.

Public names:
  Admission    the decision: client, class policy, lists, greylist parameters, route
               ("exec" | "proxy" | "refuse"), the reply of a refusal, log lines to write first,
               the per-IP connection limit the driver must take a slot for, and why it proxies
  wants_rdns   whether the driver should look the client's name up itself (TARPIT_RDNS)
  wants_dnswl  whether a DNSWL answer could change an Admission (TARPIT_DNSWL), so the driver asks
  admit        environment + config + lists + clock (+ the rDNS and DNSWL answers) -> Admission
  refuse       the Admission for our own failure before a session exists (451, one error line)
  over_limit   the Admission once the driver found every per-IP slot taken (421)
  TEMPFAIL, TOO_MANY   the replies of those refusals

This is the pure part of start-up, shared by the per-connection wrapper and the
listener: it never reads a file, the environment, a socket or the clock itself.
The driver performs the I/O the decision asks for: the DNS query (when
`wants_rdns`), the DNSWL query (when `wants_dnswl` says the first decision
could change: then `admit` again with its answer), the slot lock (when
`limit`), then exec, spawn or refuse.

Precedence, written once: TARPIT_CLASS (tcprules) wins; then RELAYCLIENT (trusted,
and neither S25R nor the allow-list is consulted, so a broken allow-list cannot
lock out our own users); then the allow-list; then the S25R rules.  A name is
trusted for the allow-list only when tcpserver confirmed it (-p, TARPIT_TRUST_HOST)
or we looked it up ourselves.
"""

from __future__ import annotations

from . import smtp
from .actions import Log
from .errors import ControlError
from .values import value

TYPE_CHECKING = False  # typing costs ~4 ms per connection
if TYPE_CHECKING:
    from typing import Any, Mapping

TEMPFAIL = smtp.reply(451, "4.3.0 Temporary local problem, please try again later")
TOO_MANY = smtp.reply(421, "4.7.0 Too many connections from your address, try again later")


class Admission(value("Admission", "client policy lists greylist route reply logs limit proxy_for reason",
                      defaults=(None, None, None, None, "refuse", b"", (), 0, (), "tempfail"))):
    """The admission decision; `route` is "exec", "proxy" or "refuse".

    client     libtarpit.client.Client (None when refused before classifying)
    policy     the ClassPolicy of its class
    lists      libtarpit.session.Lists for the checks that are on
    greylist   libtarpit.greylist.GreylistParams, or None when greylisting is off
    reply      for "refuse": the bytes to send before closing
    logs       Log actions to write before anything else (errors met on the way)
    limit      per-IP connection cap the driver must take a slot under (0: none)
    proxy_for  the checks and limits that need the proxy (empty for exec)
    reason     for "refuse": the `end` reason ("tempfail": our failure, exit 111; "conn_limit")
    """

    __slots__ = ()


def wants_rdns(env: Mapping[str, str], cfg: Any) -> bool:
    """True when the driver should do a forward-confirmed lookup of TCPREMOTEIP itself.

    That is when TARPIT_RDNS is on, there is an address, the client is not a
    RELAYCLIENT, and tcpserver gave no name or one we may not trust.
    """
    return bool(cfg.rdns and env.get("TCPREMOTEIP") and "RELAYCLIENT" not in env
                and (not env.get("TCPREMOTEHOST") or not cfg.trust_host))


def wants_dnswl(adm: Admission, cfg: Any) -> bool:
    """True when the driver should ask the DNSWL zone about this client, then admit again.

    That is only when the answer can change the outcome: a zone is set (TARPIT_DNSWL),
    and `adm` admitted a client that S25R made suspicious (not one forced there by
    TARPIT_CLASS).  Trusted, normal and refused clients cost no query.
    """
    client = adm.client
    return bool(cfg.dnswl_zone and client is not None and adm.route != "refuse"
                and client.cls == "suspicious" and not cfg.force_class and client.ip)


def refuse(what: str, detail: str) -> Admission:
    """Return the refusal for our own failure `what` (config, control...): 451 and one error line."""
    return Admission(reply=TEMPFAIL, logs=(Log("error", (("what", what), ("detail", detail))),))


def over_limit(adm: Admission) -> Admission:
    """Return `adm` turned into the per-IP cap's refusal (421, a conn_limit line)."""
    logs = adm.logs + (Log("connect"), Log("conn_limit", (("limit", adm.limit),)))
    return adm._replace(route="refuse", reply=TOO_MANY, logs=logs, reason="conn_limit")


def admit(env: Mapping[str, str], cfg: Any, lists: Any, now: float,
          rdns: tuple[str | None, str | None] | None = None, dnswl: Any = None) -> Admission:
    """Return the Admission for the client described by `env` (tcpserver's environment).

    `cfg` is a libtarpit.config.Config; `lists` a source of control lists with
    `allow()` (the s25r-allow AllowList) and `get(name)` (a ControlList or None),
    both raising ControlError for a file that exists but cannot be read;
    `rdns` is (name or None, error or None) when the driver looked the name up;
    `dnswl` the libtarpit.dnswl.Result of the query `wants_dnswl` asked for: for a
    client S25R made suspicious, a listing at `cfg.dnswl_min_level` or above makes it
    trusted (reason "dnswl"); a listing, a refusal or DNS trouble adds its log line.
    `now` is unused today and kept so that time-dependent admission (greylist
    pre-checks) needs no new argument.  Never raises: a ControlError becomes a
    refusal with 451.
    """
    from .client import classify
    from .config import BUILTIN, unknown_variables

    ip = env.get("TCPREMOTEIP", "")
    host = env.get("TCPREMOTEHOST") or None
    relay = "RELAYCLIENT" in env
    name_trusted = cfg.trust_host
    # a misspelt knob would be ignored without a word: say so on every connection it reaches
    logs: tuple[Log, ...] = tuple(Log("error", (("what", "variable"), ("detail", f"{name}: unknown, ignored")))
                                  for name in unknown_variables(env))
    if rdns is not None:
        host, err = rdns
        name_trusted = True
        if err:
            logs += (Log("error", (("what", "rdns"), ("detail", err))),)
    try:
        verdict = None
        if not relay or cfg.force_class:
            from . import s25r

            verdict = s25r.classify(host, ip, lists.allow(), extra=cfg.s25r_extra, name_trusted=name_trusted)
        client = classify(ip, host, relayclient=relay, verdict=verdict, force_class=cfg.force_class)
        if dnswl is not None and client.cls == "suspicious" and not cfg.force_class:
            from . import dnswl as wl

            logs += wl.log_lines(dnswl)
            if wl.trusts(dnswl, cfg.dnswl_min_level):
                client = client._replace(cls="trusted", reason="dnswl")
        policy = cfg.policy(client.cls)
        from . import checks

        loaded = checks.Lists(
            lists.get("badheloarg") if checks.action_of(policy, "helo") != "ignore" else None,
            lists.get("rcptusers") if checks.action_of(policy, "rcpt") != "ignore" else None,
        )
    except ControlError as e:
        refused = refuse("control", str(e))
        return refused._replace(logs=logs + refused.logs)
    params = None
    key = ip
    if policy.greylist != "off":
        from . import greylist

        params = greylist.params_for(cfg, client.cls)
        key = greylist.client_key(ip, host if name_trusted else None, params)
    client = client._replace(key=key, host=host)
    from .checks import proxy_reasons

    why = proxy_reasons(policy, loaded, BUILTIN)
    return Admission(client, policy, loaded, params, "proxy" if why else "exec", b"", logs,
                     policy.max_per_ip if ip else 0, why)
