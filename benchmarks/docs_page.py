"""docs/benchmarks.md's measured part, written by `python -m benchmarks --write-docs`.

The page keeps its hand-written explanations; only the part between `BEGIN` and `END` (what
was run, when, on what machine, the table and the section notes) is replaced by each run that
is asked to write it, so the numbers on the page are always one run's output, never edited.

Example:

```
python -m benchmarks --quick --write-docs        # docs/benchmarks.md
```
"""

from __future__ import annotations

import datetime
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- written by python -m benchmarks --write-docs: begin -->"
END = "<!-- written by python -m benchmarks --write-docs: end -->"


def render(command: str, seconds: float, machine: str, table: str, notes: list[str]) -> str:
    """The generated part: the command, the date and length of the run, the machine, the
    table and the notes."""
    day = datetime.date.today().isoformat()
    parts = [f"`{command}` on {day} ({seconds:.0f} s): {machine}.", f"```\n{table}\n```",
             *notes]
    return "\n\n".join(parts)


def write(generated: str, page: Path = PAGE) -> None:
    """Replaces the part of `page` between the markers with `generated`.

    Raises:
        ValueError: the page lacks the markers (or has them out of order), naming the fix.
    """
    text = page.read_text()
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"{page} has no {BEGIN!r} ... {END!r} section to replace. Fix: put "
                         "the two markers, each on its own line, where the table goes.")
    page.write_text(f"{text[:begin + len(BEGIN)]}\n{generated}\n{text[end:]}")
