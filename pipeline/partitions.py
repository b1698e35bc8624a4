"""--partition-filter: choose shards by their Hive partition folders (`date=2026-11-01/`), for scheduled runs.

The listing itself is pruned: a folder whose key=value fails a condition is never listed.

A filter is conditions joined by commas, all of which must hold: `date>=2026-11-01,lang=en`. Operators:
= == != < <= > >=. Values compare as numbers when both sides are numbers, else as strings (ISO dates
order correctly as strings). A shard whose path lacks a filtered key does not match.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from .errors import InputError

_OPERATORS = {
    "==": operator.eq,
    "=": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_CONDITION = re.compile(r"\s*([A-Za-z_][\w.-]*)\s*(==|!=|<=|>=|=|<|>)\s*(.+?)\s*")


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: str

    def holds(self, partitions: dict[str, str]) -> bool:
        if self.key not in partitions:
            return False
        left, right = partitions[self.key], self.value
        try:
            left, right = float(left), float(right)
        except ValueError:
            pass
        return _OPERATORS[self.op](left, right)


def parse_filter(text: str) -> list[Condition]:
    conditions = []
    for part in text.split(","):
        m = _CONDITION.fullmatch(part)
        if not m:
            raise InputError(
                f"--partition-filter {text!r}: cannot read {part.strip()!r}; "
                f"write conditions like date>=2026-11-01,lang=en"
            )
        conditions.append(Condition(m[1], m[2], m[3].strip("'\"")))
    return conditions


def partitions_of(relative: str) -> dict[str, str]:
    """The key=value folders of a shard's relative path."""
    return dict(part.split("=", 1) for part in relative.split("/")[:-1] if "=" in part)


def matches(relative: str, conditions: list[Condition]) -> bool:
    """Whether a shard's relative path is in the selection."""
    partitions = partitions_of(relative)
    return all(c.holds(partitions) for c in conditions)


def may_hold_matches(folder: str, conditions: list[Condition]) -> bool:
    """Whether a folder (relative, "/"-separated) may hold matching shards: no condition on its keys fails.

    Keys that appear only deeper are not decided yet, so the listing descends; this is what lets
    `date=2026-11-01` be listed without listing the other 10,000 days.
    """
    partitions = partitions_of(folder + "/")
    return all(c.holds(partitions) for c in conditions if c.key in partitions)
