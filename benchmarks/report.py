"""Statistics and the table: medians with spreads, paired ratios, one row per comparison."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Stat:
    """The median of repeated measurements and their range (the spread)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def show(self, unit: str = "", digits: int = 1) -> str:
        """`12.3 ms (11.9-13.0)`; the range is left out for a single measurement."""
        text = f"{self.median:.{digits}f}{unit}"
        if self.count > 1:
            text += f" ({self.low:.{digits}f}-{self.high:.{digits}f})"
        return text


def paired_ratios(ours: Sequence[float], peer: Sequence[float]) -> Stat:
    """Ratios of measurements taken side by side (same round), summarised."""
    if len(ours) != len(peer):
        raise ValueError(f"unpaired measurements: {len(ours)} vs {len(peer)}")
    return Stat.of([a / b for a, b in zip(ours, peer)])


@dataclasses.dataclass(frozen=True)
class Goal:
    """An upper bound on a median (a ratio by default): met when the median is at most it."""

    at_most: float
    unit: str = "x"

    def verdict(self, median: float) -> str:
        mark = "met" if median <= self.at_most else "MISSED"
        return f"<= {self.at_most:g}{self.unit}: {mark}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: what was measured, ours, the peer's, the ratio, the goal."""

    what: str
    disttrain: str
    peer: str
    ratio: str = "-"
    goal: str = "-"


def ratio_row(what: str, ours: Sequence[float], peer_name: str, peer: Sequence[float],
              unit: str, goal: Goal | None = None, digits: int = 1) -> Row:
    """A row comparing paired measurements; the ratio is the median of per-round ratios."""
    ratio = paired_ratios(ours, peer)
    return Row(
        what,
        Stat.of(ours).show(unit, digits),
        f"{peer_name}: {Stat.of(peer).show(unit, digits)}",
        ratio.show("x", 2),
        goal.verdict(ratio.median) if goal else "-",
    )


HEADER = Row("what", "disttrain", "peer", "ratio", "goal")


def table(rows: Sequence[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [dataclasses.astuple(r) for r in [HEADER, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
