"""The control directory as the admission step reads it: each list loaded once, when asked for.

Public names:
  ControlDir   get(name) -> ControlList or None; allow() -> the s25r-allow AllowList

This is the I/O half of admission (libtarpit.admission is the pure half): a
driver makes one ControlDir per connection (the wrapper) or per change of the
files (a long-running listener) and hands it to `admit`.  A missing directory
is an error, not "no lists": a typo in TARPIT_CONTROL would otherwise turn every
list off, the allow-list included, without a word.
"""

from __future__ import annotations

import os

from .errors import ControlError


class ControlDir:
    """Lists under `directory`, loaded lazily and kept; ControlError for an unreadable one."""

    def __init__(self, directory: str, cache_dir: str | None = None):
        self.directory = directory
        self.cache_dir = cache_dir
        self._lists: dict[str, object] = {}
        self._checked = False

    def _check_dir(self) -> None:
        if not self._checked:
            if not os.path.isdir(self.directory):
                raise ControlError(self.directory, "control directory does not exist")
            self._checked = True

    def get(self, name: str):
        """Return the ControlList `name` (NAME.cdb, else NAME), or None when neither exists.

        Raises ControlError when the directory is missing or the list exists but
        cannot be read or parsed.
        """
        if name not in self._lists:
            self._check_dir()
            path = os.path.join(self.directory, name)
            if not (os.path.lexists(path) or os.path.lexists(path + ".cdb")):
                self._lists[name] = None  # the common case: skip importing control and cdblib
            else:
                from . import control

                self._lists[name] = control.ControlList.load(self.directory, name, cache_dir=self.cache_dir)
        return self._lists[name]

    def allow(self):
        """Return the s25r-allow AllowList (empty when the file is absent); ControlError if unreadable."""
        if "s25r-allow" not in self._lists:
            self._check_dir()
            from . import s25r

            self._lists["s25r-allow"] = s25r.AllowList.load(os.path.join(self.directory, "s25r-allow"))
        return self._lists["s25r-allow"]
