"""A benchmark's result: rows of figures, each against a baseline of the same run and a goal."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One figure. ``status``: "met", "MISSED" or "" (information only, no goal)."""

    metric: str
    value: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    status: str = ""
    note: str = ""


def goal_row(metric: str, value: str, achieved: float, goal: float, higher_is_better: bool, goal_text: str,
             baseline: str = "", ratio_text: str = "", note: str = "") -> Row:
    ok = achieved >= goal if higher_is_better else achieved <= goal
    if isinstance(achieved, float) and math.isnan(achieved):
        ok = False
    return Row(metric, value, baseline, ratio_text, goal_text, "met" if ok else "MISSED", note)


@dataclass
class Result:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    method: str = ""
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    seconds: float = 0.0
    command: str = ""
    load: str = ""
    error: str = ""

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    @property
    def missed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "MISSED"]
