"""Exception types shared across libtarpit.

Public names:
  ControlError   a control file exists but cannot be read or parsed (the wrapper answers 451)
  StoreError     the greylist store is down, slow or corrupt (the wrapper fails open)
"""

from __future__ import annotations


class ControlError(Exception):
    """A control file exists but cannot be read or parsed.

    `path` names the file; `line` is the 1-based line number when one line is
    at fault (None otherwise).  str() gives "path:line: reason", fit for a log line.
    """

    def __init__(self, path: str, reason: str, line: int | None = None):
        self.path = path
        self.reason = reason
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class StoreError(Exception):
    """The greylist store could not answer (down, timed out, corrupt)."""
