"""JSON from clients (request bodies, the ``X-Safety-Config`` header) parsed with two rules of
ours before any validator walks it:

- **A bounded number of values.** Validation walks every value on the event loop (the lone-
  surrogate check, pydantic, a schema's depth), about 2 µs each: 8 MiB of ``[0,0,...]`` under
  any field held every other request, ``/health`` included, for up to 24 s (measured). No real
  request comes near the bound (4096 messages and 4096 text parts are the largest lists).
- **Each key once.** Parsers differ on which of two equal keys wins; a gateway or audit log
  that reads the first would see another conversation or config than the server runs.

One parse: its per-object hook checks the keys and counts the members as it goes (so a body
of a million tiny objects is refused at the bound, not after), then the lists of scalars, which
no hook sees, are counted on the result. (8 MiB of nested empty lists still costs its native
parse, 0.8 s here; 8 MiB of objects is refused in 0.02 s, of numbers in 0.13 s.)
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_VALUES = 1 << 16


class RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key[:64]  # echoed in the error


class TooManyValues(ValueError):
    pass


class _KeysOnceCounted:
    """``object_pairs_hook``: each key once, and at most ``budget`` members and objects."""

    def __init__(self, budget: int):
        self.left = budget

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict:
        self.left -= len(pairs) + 1
        if self.left < 0:
            raise TooManyValues
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen[key] = value
        return seen


def values_over(value: Any, budget: int) -> bool:
    """Whether ``value`` holds more than ``budget`` JSON values (containers counted with
    their items); stops as soon as it knows, so it costs at most the budget."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        count += len(items)
        if count > budget:
            return True
        stack.extend(items)
    return False


def loads_checked(text: str | bytes, budget: int = MAX_JSON_VALUES) -> Any:
    """``json.loads`` that raises TooManyValues or RepeatedKey (both ValueErrors, as is a
    JSONDecodeError)."""
    value = json.loads(text, object_pairs_hook=_KeysOnceCounted(budget))
    if values_over(value, budget):
        raise TooManyValues
    return value
