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
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

CLASSES = ("trusted", "suspicious", "normal")
CHECKS = ("pregreet", "helo", "rcpt", "tarpit", "greylist", "pipelining")
ACTIONS = ("ignore", "warn", "enforce", "drop")
STAGES = ("helo", "mail", "rcpt", "data")
GREYLIST_MODES = ("off", "targrey", "tarpit", "greylist")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key and source."""


@dataclass(frozen=True)
class ClassPolicy:
    """Knobs for one client class.  Durations are seconds."""

    greet_pause: float = 0.0
    tarpit: float = 0.0
    tarpit_stage: str = "rcpt"
    greylist: str = "off"
    idle_timeout: float = 300.0
    error_sleep: float = 1.0
    error_soft_limit: int = 10
    error_hard_limit: int = 20
    recipient_limit: int = 1000
    hide_pipelining: bool = False
    helo_check: bool = True
    rcpt_check: bool = True
    max_per_ip: int = 0
    pregreet: str = "enforce"
    helo: str = "enforce"
    rcpt: str = "enforce"
    tarpit_action: str = "enforce"
    greylist_action: str = "enforce"
    pipelining: str = "warn"

    def action(self, check: str) -> str:
        """Return the configured action for `check` (one of CHECKS)."""
        return getattr(self, {"tarpit": "tarpit_action", "greylist": "greylist_action"}.get(check, check))

    @property
    def needs_proxy(self) -> bool:
        """True when some per-command check or limit applies (no exec fast path)."""
        return bool(
            (self.tarpit > 0 and self.tarpit_action != "ignore")
            or self.greylist != "off"
            or self.hide_pipelining
        )


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


@dataclass(frozen=True)
class Config:
    """Everything the wrapper reads at start.  `classes` maps class -> ClassPolicy."""

    control: str = "/var/qmail/control"
    mode: str = "enforce"
    force_class: str | None = None
    s25r_extra: bool = False
    rdns: bool = False
    rdns_timeout: float = 2.0
    rdns_server: str = ""
    trust_host: bool = True
    state_dir: str = "/var/lib/tarpit-smtpd"
    greylist_url: str = "/var/lib/tarpit-smtpd/greylist.sqlite"
    greylist_delay: float = 1200.0
    greylist_retries: int = 2
    greylist_whitelist: float = 3600.0
    greylist_expire: float = 35 * 86400.0
    greylist_key: str = "net"
    greylist_timeout: float = 0.5
    classes: Mapping[str, ClassPolicy] = field(default_factory=lambda: dict(DEFAULTS))

    def policy(self, cls: str) -> ClassPolicy:
        """Return the ClassPolicy for `cls`, with warn mode applied to every action."""
        pol = self.classes[cls]
        if self.mode == "warn":
            pol = replace(pol, **{
                f.name: "warn" for f in fields(ClassPolicy)
                if f.name in _ACTION_FIELDS and getattr(pol, f.name) in ("enforce", "drop")
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
}

_POSITIVE = {"greylist_expire", "greylist_timeout", "greylist_delay"}

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
            if value < 0:
                raise ValueError(raw)
            return value
        value = str(raw).strip()
        if name == "force_class" and value == "":
            return None
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(raw)
        if name == "rdns_server" and value:
            from .rdns import parse_server

            parse_server(value)
        return value
    except (TypeError, ValueError):
        hint = f" (one of {', '.join(_CHOICES[name])})" if name in _CHOICES else ""
        raise ConfigError(f"{source}: bad value {raw!r} for {name}{hint}") from None


def _types(cls: type) -> dict[str, Any]:
    return {f.name: f.type for f in fields(cls)}


_CLASS_TYPES = _types(ClassPolicy)
_GLOBAL_TYPES = {k: v for k, v in _types(Config).items() if k != "classes"}


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
    classes = {c: replace(DEFAULTS[c], **{**per_class[c], **client}) for c in CLASSES}
    return Config(**glob, classes=classes)
