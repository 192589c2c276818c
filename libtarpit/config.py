"""Configuration: built-in defaults < tarpit.toml < environment, read once.

Public names:
  CLASSES         the client classes ("trusted", "suspicious", "normal")
  CHECKS          the checks whose action is configurable
  ACTIONS         "ignore" | "warn" | "enforce" | "drop"
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

CLASSES = ("trusted", "suspicious", "normal")
CHECKS = ("pregreet", "helo", "rcpt", "tarpit", "greylist", "pipelining")
ACTIONS = ("ignore", "warn", "enforce", "drop")
STAGES = ("helo", "mail", "rcpt", "data")
GREYLIST_MODES = ("off", "targrey", "tarpit", "greylist")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key and source."""


_CLASS_DEFAULTS: dict[str, Any] = {
    "greet_pause": 0.0, "tarpit": 0.0, "tarpit_stage": "rcpt", "greylist": "off",
    "idle_timeout": 300.0, "error_sleep": 1.0, "error_soft_limit": 10, "error_hard_limit": 20,
    "recipient_limit": 1000, "hide_pipelining": False, "helo_check": True, "rcpt_check": True,
    "max_per_ip": 0, "pregreet": "enforce", "helo": "enforce", "rcpt": "enforce",
    "tarpit_action": "enforce", "greylist_action": "enforce", "pipelining": "warn",
}


class ClassPolicy(namedtuple("ClassPolicy", list(_CLASS_DEFAULTS), defaults=list(_CLASS_DEFAULTS.values()))):
    """Knobs for one client class (immutable).  Durations are seconds."""

    __slots__ = ()

    def action(self, check: str) -> str:
        """Return the configured action for `check` (one of CHECKS)."""
        return getattr(self, {"tarpit": "tarpit_action", "greylist": "greylist_action"}.get(check, check))

    @property
    def needs_proxy(self) -> bool:
        """True when a per-command check of the policy itself applies (tarpit, greylist, PIPELINING)."""
        return bool(
            (self.tarpit > 0 and self.tarpit_action != "ignore")
            or self.greylist != "off"
            or self.hide_pipelining
        )

    def fast_path(self, has_badheloarg: bool, has_rcptusers: bool) -> bool:
        """True when nothing is checked per command, so the backend can be exec'd.

        The only place that decides between exec and proxy: the session and the
        wrapper's start-up short cut both ask here.
        """
        return not (self.needs_proxy
                    or (self.helo_check and has_badheloarg)
                    or (self.rcpt_check and has_rcptusers))


DEFAULTS: dict[str, ClassPolicy] = {
    "trusted": ClassPolicy(helo_check=False, rcpt_check=False),
    "suspicious": ClassPolicy(
        tarpit=65.0, greylist="targrey", idle_timeout=60.0, hide_pipelining=True
    ),
    "normal": ClassPolicy(),
}

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
    "hide_pipelining": "TARPIT_HIDE_PIPELINING",
    "helo_check": "TARPIT_HELO_CHECK",
    "rcpt_check": "TARPIT_RCPT_CHECK",
    "max_per_ip": "TARPIT_MAX_PER_IP",
    "pregreet": "TARPIT_ACTION_PREGREET",
    "helo": "TARPIT_ACTION_HELO",
    "rcpt": "TARPIT_ACTION_RCPT",
    "tarpit_action": "TARPIT_ACTION_TARPIT",
    "greylist_action": "TARPIT_ACTION_GREYLIST",
    "pipelining": "TARPIT_ACTION_PIPELINING",
}


_GLOBAL_DEFAULTS: dict[str, Any] = {
    "control": "/var/qmail/control", "mode": "enforce", "force_class": None, "s25r_extra": False,
    "rdns": False, "rdns_timeout": 2.0, "rdns_server": "", "trust_host": True,
    "state_dir": "/var/lib/tarpit-smtpd", "greylist_url": "/var/lib/tarpit-smtpd/greylist.sqlite",
    "greylist_delay": 1200.0, "greylist_retries": 2, "greylist_whitelist": 3600.0,
    "greylist_expire": 35 * 86400.0, "greylist_key": "net", "greylist_timeout": 0.5,
    "greylist_ipv4_prefix": 24, "greylist_ipv6_prefix": 64,
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


_ACTION_FIELDS = {"pregreet", "helo", "rcpt", "tarpit_action", "greylist_action", "pipelining"}

GLOBAL_ENV: dict[str, str] = {
    "control": "TARPIT_CONTROL",
    "mode": "TARPIT_MODE",
    "force_class": "TARPIT_CLASS",
    "s25r_extra": "TARPIT_S25R_EXTRA",
    "rdns": "TARPIT_RDNS",
    "rdns_timeout": "TARPIT_RDNS_TIMEOUT",
    "rdns_server": "TARPIT_RDNS_SERVER",
    "trust_host": "TARPIT_TRUST_HOST",
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
}

_STORE_SCHEMES = ("redis://", "rediss://", "unix://", "sqlite://")
_INT_MAX = {"greylist_ipv4_prefix": 32, "greylist_ipv6_prefix": 128}
_POSITIVE = {"greylist_expire", "greylist_timeout"}

_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("enforce", "warn"),
    "force_class": CLASSES,
    "tarpit_stage": STAGES,
    "greylist": GREYLIST_MODES,
    "greylist_key": ("net", "name"),
    **{name: ACTIONS for name in _ACTION_FIELDS},
}


def _convert(name: str, raw: Any, kind: Any, source: str) -> Any:
    """Return `raw` converted to the type of field `name`; ConfigError if it does not fit."""
    try:
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
            if not value >= 0 or value == float("inf") or (value == 0 and name in _POSITIVE):
                raise ValueError(raw)
            return value
        if kind in (int, "int"):
            value = int(raw)
            if value < 0 or value > _INT_MAX.get(name, value):
                raise ValueError(raw)
            return value
        value = str(raw).strip()
        if name == "force_class" and value == "":
            return None
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(raw)
        if name == "greylist_url" and "://" in value and not value.startswith(_STORE_SCHEMES):
            raise ValueError(raw)  # a typo must not silently become a SQLite file name
        if name == "rdns_server" and value:
            from .rdns import parse_server

            parse_server(value)
        return value
    except (TypeError, ValueError):
        hint = f" (one of {', '.join(_CHOICES[name])})" if name in _CHOICES else ""
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
    for key, var in ENV_KEYS.items():
        if var in env:
            client[key] = _convert(key, env[var], _CLASS_TYPES[key], f"${var}")
    classes = {c: DEFAULTS[c]._replace(**{**per_class[c], **client}) for c in CLASSES}
    return Config(**glob, classes=classes)
