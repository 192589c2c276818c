"""libtarpit: the pure library behind tarpit-smtpd.

Modules:
  s25r      S25R rules 0-6, allow-list, extra patterns -> Verdict
  control   control files (CDB or text): badheloarg, rcptusers; cdb compile
  sleep     disconnect-aware sleep on a socket fd
  smtp      sans-I/O SMTP: parse client commands and backend replies, build replies
  session   sans-I/O policy state machine: bytes and time in, actions out
  greylist  taRgrey state machine and its stores (SQLite, Redis)
  config    defaults < tarpit.toml < environment, read once into a frozen Config
  log       one logfmt line per event; the matching parser
  stats     logs -> seed 000's tables and seed 001's funnel

Nothing here reads os.environ or touches a socket at import time.
"""

__version__ = "0.1.0"
