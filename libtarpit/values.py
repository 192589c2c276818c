"""Immutable value types that cost next to nothing to import.

Public names:
  value   make a frozen record class (a named tuple that only equals its own type)

Commands, replies, verdicts, sleep results and session actions are immutable
values.  They are named tuples rather than dataclasses because the wrapper
starts once per SMTP connection and `import dataclasses` (through `inspect`)
costs about 11 ms there, more than the rest of libtarpit together (measured
with python -X importtime; see bench/).  Plain named tuples compare equal to
any tuple with the same items, so `Exec() == StartBackend()` would be true;
`value` adds type-aware equality.
"""

from __future__ import annotations

from collections import namedtuple
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~4 ms per connection

if TYPE_CHECKING:
    from typing import Any


def value(name: str, fields: str, defaults: tuple[Any, ...] = (), module: str | None = None) -> type:
    """Return a named-tuple base class `name` whose instances equal only instances of the same class."""
    base = namedtuple(name, fields, defaults=defaults, module=module)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not __eq__(self, other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self)))

    return type(name, (base,), {"__slots__": (), "__eq__": __eq__, "__ne__": __ne__, "__hash__": __hash__})
