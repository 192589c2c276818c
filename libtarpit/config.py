"""Configuration: built-in defaults < tarpit.toml < environment, read once.

Public names:
  CLASSES         the client classes ("trusted", "suspicious", "normal")
  ACTIONS         "ignore" | "warn" | "enforce" | "drop" (from libtarpit.checks)
  BUILTIN         a ClassPolicy of built-in values (a limit differing from it was set)
  MAX_SECONDS     the largest value of a per-class duration knob
  ClassPolicy     the per-class knobs (frozen)
  Config          everything the wrapper needs, per class (frozen)
  ConfigError     a bad value; str() names the key and the source
  load_config     build a Config from a mapping (the environment) and TOML text
  ENV_KEYS        per-class knob -> environment variable name

The environment holds values for *this* client (tcprules sets them per
client, the way rblsmtpd reads RBLSMTPD), so an environment variable
overrides the value of whatever class the client falls in.  tarpit.toml holds
the per-class defaults in tables [trusted], [suspicious], [normal] and the
global keys at the top level.  Unknown keys and bad values are errors at
start-up, never at run time (as postscreen parses its actions once).

ClassPolicy and Config are immutable named tuples rather than dataclasses:
this module is imported on every connection, and `dataclasses` (through
`inspect`) alone costs ~11 ms of start-up, more than everything else we load.
Change a value with `._replace(key=value)`.
"""

from __future__ import annotations

from collections import namedtuple
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

if TYPE_CHECKING:
    from typing import Any, Mapping

from .checks import ACTIONS, CHECKS

CLASSES = ("trusted", "suspicious", "normal")
STAGES = ("helo", "mail", "rcpt", "data")
GREYLIST_MODES = ("off", "targrey", "tarpit", "greylist")
MAX_SECONDS = 86400.0  # no duration knob may exceed a day: TARPIT="1e9" is a typo, not a policy


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key and source."""


# the knobs of one class; each check's action knob comes from libtarpit.checks
_KNOBS: dict[str, Any] = {
    "greet_pause": 0.0, "tarpit": 0.0, "tarpit_stage": "rcpt", "greylist": "off",
    "idle_timeout": 300.0, "error_sleep": 1.0, "error_soft_limit": 10, "error_hard_limit": 20,
    "recipient_limit": 1000, "session_limit": 0.0, "min_data_rate": 0, "hide_pipelining": False,
    "max_per_ip": 0, "tarpit_before_tls": False,
}
_ACTION_FIELDS = {c.key for c in CHECKS.values()}
_CLASS_DEFAULTS: dict[str, Any] = {**_KNOBS, **{c.key: c.defaults[2] for c in CHECKS.values()}}


class ClassPolicy(namedtuple("ClassPolicy", list(_CLASS_DEFAULTS), defaults=list(_CLASS_DEFAULTS.values()))):
    """Knobs for one client class (immutable).  Durations are seconds.

    The action of check NAME is the field `libtarpit.checks.CHECKS[NAME].key`;
    `action(NAME)` reads it.
    """

    __slots__ = ()

    def action(self, check: str) -> str:
        """Return the configured action for `check` (a name in libtarpit.checks.CHECKS)."""
        return getattr(self, CHECKS[check].key)


def _class_defaults(index: int) -> dict[str, Any]:
    return {c.key: c.defaults[index] for c in CHECKS.values()}


DEFAULTS: dict[str, ClassPolicy] = {
    "trusted": ClassPolicy(**_class_defaults(0)),
    "suspicious": ClassPolicy(
        **_class_defaults(1), tarpit=65.0, greylist="targrey", idle_timeout=60.0, hide_pipelining=True,
        session_limit=600.0, min_data_rate=100, tarpit_before_tls=True,
    ),
    "normal": ClassPolicy(**_class_defaults(2)),
}
BUILTIN = ClassPolicy()  # the values a limit is compared with to tell whether somebody set it

ENV_KEYS: dict[str, str] = {
    "greet_pause": "GREETDELAY",
    "tarpit": "TARPIT",
    "tarpit_stage": "TARPIT_STAGE",
    "greylist": "TARPIT_GREYLIST",
    "idle_timeout": "TARPIT_TIMEOUT",
    "error_sleep": "TARPIT_ERROR_SLEEP",
    "error_soft_limit": "TARPIT_ERROR_SOFT",
    "error_hard_limit": "TARPIT_ERROR_HARD",
    "recipient_limit": "TARPIT_RCPT_LIMIT",
    "session_limit": "TARPIT_SESSION_LIMIT",
    "min_data_rate": "TARPIT_MIN_DATA_RATE",
    "hide_pipelining": "TARPIT_HIDE_PIPELINING",
    "max_per_ip": "TARPIT_MAX_PER_IP",
    "tarpit_before_tls": "TARPIT_BEFORE_TLS",
    **{c.key: "TARPIT_ACTION_" + c.name.upper() for c in CHECKS.values()},
}
# Older switches, still read so a running tcp.smtp keeps its meaning: off = action "ignore"
_OLD_SWITCHES = {"helo_check": ("TARPIT_HELO_CHECK", ("helo", "helo_nodot")),
                 "rcpt_check": ("TARPIT_RCPT_CHECK", ("rcpt",))}


_GLOBAL_DEFAULTS: dict[str, Any] = {
    "control": "/var/qmail/control", "mode": "enforce", "force_class": None, "s25r_extra": True,
    "rdns": False, "rdns_timeout": 2.0, "rdns_server": "", "trust_host": True,
    "dnswl_zone": "", "dnswl_min_level": 1, "dnswl_timeout": 2.0, "dnswl_server": "",
    "state_dir": "/var/lib/tarpit-smtpd", "greylist_url": "/var/lib/tarpit-smtpd/greylist.sqlite",
    "greylist_delay": 1200.0, "greylist_retries": 2, "greylist_whitelist": 3600.0,
    "greylist_expire": 35 * 86400.0, "greylist_key": "net", "greylist_timeout": 0.5,
    "greylist_ipv4_prefix": 24, "greylist_ipv6_prefix": 64, "tls_cert": "", "tls_key": "",
}


class Config(namedtuple("Config", [*_GLOBAL_DEFAULTS, "classes"],
                        defaults=[*_GLOBAL_DEFAULTS.values(), None])):
    """Everything the wrapper reads at start (immutable).  `classes` maps class -> ClassPolicy."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> "Config":
        self = super().__new__(cls, *args, **kwargs)
        return self if self.classes is not None else self._replace(classes=dict(DEFAULTS))

    def policy(self, cls: str) -> ClassPolicy:
        """Return the ClassPolicy for `cls`, with warn mode applied to every action."""
        pol = self.classes[cls]
        if self.mode == "warn":
            pol = pol._replace(**{
                name: "warn" for name in _ACTION_FIELDS if getattr(pol, name) in ("enforce", "drop")
            })
        return pol



GLOBAL_ENV: dict[str, str] = {
    "control": "TARPIT_CONTROL",
    "mode": "TARPIT_MODE",
    "force_class": "TARPIT_CLASS",
    "s25r_extra": "TARPIT_S25R_EXTRA",
    "rdns": "TARPIT_RDNS",
    "rdns_timeout": "TARPIT_RDNS_TIMEOUT",
    "rdns_server": "TARPIT_RDNS_SERVER",
    "trust_host": "TARPIT_TRUST_HOST",
    "dnswl_zone": "TARPIT_DNSWL",
    "dnswl_min_level": "TARPIT_DNSWL_MIN_LEVEL",
    "dnswl_timeout": "TARPIT_DNSWL_TIMEOUT",
    "dnswl_server": "TARPIT_DNSWL_SERVER",
    "state_dir": "TARPIT_STATE_DIR",
    "greylist_url": "TARPIT_GREYLIST_URL",
    "greylist_delay": "TARPIT_GREYLIST_DELAY",
    "greylist_retries": "TARPIT_GREYLIST_RETRIES",
    "greylist_whitelist": "TARPIT_GREYLIST_WHITELIST",
    "greylist_expire": "TARPIT_GREYLIST_EXPIRE",
    "greylist_key": "TARPIT_GREYLIST_KEY",
    "greylist_timeout": "TARPIT_GREYLIST_TIMEOUT",
    "greylist_ipv4_prefix": "TARPIT_GREYLIST_IPV4_PREFIX",
    "greylist_ipv6_prefix": "TARPIT_GREYLIST_IPV6_PREFIX",
    "tls_cert": "TARPIT_TLS_CERT",
    "tls_key": "TARPIT_TLS_KEY",
}

_STORE_SCHEMES = ("redis://", "rediss://", "unix://", "sqlite://")
_INT_MAX = {"greylist_ipv4_prefix": 32, "greylist_ipv6_prefix": 128, "dnswl_min_level": 254}
_POSITIVE = {"greylist_expire", "greylist_timeout", "dnswl_timeout"}
_FLOAT_MAX = {"greylist_delay": 30 * 86400.0, "greylist_whitelist": 400 * 86400.0,
              "greylist_expire": 400 * 86400.0, "greylist_timeout": 60.0, "rdns_timeout": 60.0,
              "dnswl_timeout": 60.0}

_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("enforce", "warn"),
    "force_class": CLASSES,
    "tarpit_stage": STAGES,
    "greylist": GREYLIST_MODES,
    "greylist_key": ("net", "name"),
    **{name: ACTIONS for name in _ACTION_FIELDS},
}


# Every environment variable load_config reads: serve keys its cache of Configs on their values,
# and unknown_variables tells a typo from them.
VARIABLES: tuple[str, ...] = tuple(sorted({*ENV_KEYS.values(), *GLOBAL_ENV.values(),
                                           *(var for var, _ in _OLD_SWITCHES.values())}))
_KNOWN = frozenset(VARIABLES) | {"TARPIT_CONFIG", "TARPIT_PREFIX", "TARPIT_BINDIR", "TARPIT_MANDIR"}  # setup.sh's


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """Return the TARPIT_* names in `env` that nothing of ours reads (a typo such as
    TARPIT_TARPTI), sorted; [] when there are none.  Never raises."""
    return sorted(n for n in env if n.startswith("TARPIT_") and n not in _KNOWN)


def _convert(name: str, raw: Any, kind: Any, source: str) -> Any:
    """Return `raw` converted to the type of field `name`; ConfigError if it does not fit.

    A TOML string where a number or a boolean belongs ("65") is an error: TOML has types,
    and a quoted number is a typo worth hearing about.  Environment values are text.
    """
    try:
        if kind in (bool, "bool", float, "float", int, "int") and not source.startswith("$") \
                and isinstance(raw, str):
            raise ValueError(raw)
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "yes", "true", "on"):
                return True
            if text in ("0", "no", "false", "off", ""):
                return False
            raise ValueError(raw)
        if kind in (float, "float"):
            value = float(raw)
            if not 0 <= value <= _FLOAT_MAX.get(name, MAX_SECONDS) or (value == 0 and name in _POSITIVE):
                raise ValueError(raw)
            return value
        if kind in (int, "int"):
            if isinstance(raw, float):
                raise ValueError(raw)
            value = int(raw)
            if value < 0 or value > _INT_MAX.get(name, value):
                raise ValueError(raw)
            return value
        value = str(raw).strip()
        if name == "force_class" and value == "":
            return None
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(raw)
        if name == "greylist_url" and ("://" in value or value.split("/", 1)[0].rstrip(":").lower()
                                       in ("redis", "rediss", "unix", "sqlite")) \
                and not value.startswith(_STORE_SCHEMES):
            raise ValueError(raw)  # a typo ("redis//host") must not silently become a SQLite file name
        if name in ("rdns_server", "dnswl_server") and value:
            from .rdns import parse_server

            parse_server(value)
        if name == "dnswl_zone" and value:
            from .dnswl import parse_zone  # pure: neither dnspython nor ipaddress

            value = parse_zone(value)
        return value
    except (TypeError, ValueError):
        hint = f" (one of {', '.join(_CHOICES[name])})" if name in _CHOICES else ""
        if kind in (float, "float"):
            hint = f" (seconds, 0 to {_FLOAT_MAX.get(name, MAX_SECONDS):g})"
        raise ConfigError(f"{source}: bad value {raw!r} for {name}{hint}") from None


def _types(defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: (str if v is None else type(v)) for k, v in defaults.items()}


_CLASS_TYPES = _types(_CLASS_DEFAULTS)
_GLOBAL_TYPES = _types(_GLOBAL_DEFAULTS)


def load_config(env: Mapping[str, str], toml_text: str | None = None,
                toml_source: str = "tarpit.toml") -> Config:
    """Return the Config from defaults, then `toml_text` (if any), then `env`.

    Raises ConfigError for an unknown TOML key, a malformed TOML file, or a
    value of the wrong type or outside its choices (in TOML or environment).
    """
    glob: dict[str, Any] = {}
    per_class: dict[str, dict[str, Any]] = {c: {} for c in CLASSES}
    if toml_text is not None:
        import tomllib

        try:
            data = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{toml_source}: {e}") from None
        for key, value in data.items():
            if key in CLASSES and isinstance(value, dict):
                for k, v in value.items():
                    if k in _OLD_SWITCHES:
                        if not _convert(k, v, bool, f"{toml_source} [{key}]"):
                            per_class[key].update(dict.fromkeys(_OLD_SWITCHES[k][1], "ignore"))
                        continue
                    if k not in _CLASS_TYPES:
                        raise ConfigError(f"{toml_source}: unknown key [{key}] {k}")
                    per_class[key][k] = _convert(k, v, _CLASS_TYPES[k], f"{toml_source} [{key}]")
            elif key in _GLOBAL_TYPES:
                glob[key] = _convert(key, value, _GLOBAL_TYPES[key], toml_source)
            else:
                raise ConfigError(f"{toml_source}: unknown key {key}")
    for key, var in GLOBAL_ENV.items():
        if var in env:
            glob[key] = _convert(key, env[var], _GLOBAL_TYPES[key], f"${var}")
    client: dict[str, Any] = {}
    for key, (var, checks) in _OLD_SWITCHES.items():
        if var in env and not _convert(key, env[var], bool, f"${var}"):
            client.update(dict.fromkeys((CHECKS[c].key for c in checks), "ignore"))
    for key, var in ENV_KEYS.items():
        if var in env:
            client[key] = _convert(key, env[var], _CLASS_TYPES[key], f"${var}")
    classes = {c: DEFAULTS[c]._replace(**{**per_class[c], **client}) for c in CLASSES}
    return Config(**glob, classes=classes)
