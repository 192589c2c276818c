"""Where the programs find their configuration: one answer for the wrapper and tarpitctl.

    read_config(env, control=None, config=None) -> (Config, control_dir, config_path)

The file is `config` (--config), else $TARPIT_CONFIG, else CONTROL/tarpit.toml
when it exists, CONTROL being `control` (--control), else $TARPIT_CONTROL,
else /var/qmail/control.  An empty value means unset.  After loading, the
control directory is --control if given, else the configuration's `control`.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # importing typing costs ~4 ms per connection
if TYPE_CHECKING:
    from typing import Mapping

DEFAULT_CONTROL = "/var/qmail/control"


def read_config(env: Mapping[str, str], control: str | None = None, config: str | None = None):
    """Return (Config, control directory, path of tarpit.toml or None).

    Raises libtarpit.config.ConfigError for a bad value or key, OSError or
    UnicodeDecodeError when the file named cannot be read.
    """
    from libtarpit.config import load_config

    first_control = control or env.get("TARPIT_CONTROL") or DEFAULT_CONTROL
    path = config or env.get("TARPIT_CONFIG") or None
    if path is None:
        candidate = os.path.join(first_control, "tarpit.toml")
        path = candidate if os.path.exists(candidate) else None
    text = None
    if path is not None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    cfg = load_config(env, text, path or "tarpit.toml")
    return cfg, control or cfg.control, path
