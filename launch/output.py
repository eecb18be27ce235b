"""Worker output: split byte streams into whole lines and write them prefixed.

Workers write whatever they like to their pipes: partial lines, `\\r` progress
bars, bytes cut at arbitrary points. `LineSplitter` turns that into whole lines;
`OutputStream` adds the worker's prefix, a raw log file and a tail kept for
error reports; `Console` writes each line with one `write` call and a flush, so
lines of different workers never mix mid-line.

Carriage returns: a segment ended by `\\r` is an *update* of the current line
(a progress bar redrawing itself). Updates become ordinary lines, at most one per
`progress_interval` seconds per stream; the last update before the line is
finished always shows. A launcher cannot redraw one terminal line per worker, so
lines are the only output that stays readable with several workers.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import BinaryIO

_EOL = re.compile(rb"[\r\n]")

PROGRESS_INTERVAL_S = 1.0
MAX_LINE_BYTES = 64 * 1024
TAIL_LINES = 20


class LineSplitter:
    """Splits a byte stream into lines, throttling `\\r` line updates.

    Feed it bytes as they arrive; it returns the complete lines (without line
    endings) that are ready to show. A line longer than `max_line` bytes is cut
    into pieces of that size so memory stays bounded.

    >>> s = LineSplitter(progress_interval=10.0)
    >>> s.feed(b"epoch 1\\n 1/3\\r 2/3\\r 3/3", now=0.0)
    [b'epoch 1', b' 1/3']
    >>> s.feed(b"\\n", now=0.1)
    [b' 3/3']
    """

    def __init__(self, progress_interval: float = PROGRESS_INTERVAL_S,
                 max_line: int = MAX_LINE_BYTES):
        self._interval = progress_interval
        self._max_line = max_line
        self._buf = bytearray()
        self._pending: bytes | None = None
        self._last_update: float | None = None
        self._after_cr = False

    @property
    def next_flush(self) -> float | None:
        """When a held-back update is due to show, or None if there is none."""
        if self._pending is None or self._last_update is None:
            return None
        return self._last_update + self._interval

    def feed(self, data: bytes, now: float) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        pos = 0
        for m in _EOL.finditer(self._buf):
            segment = bytes(self._buf[pos:m.start()])
            pos = m.end()
            if m.group() == b"\n":
                lines += self._end_line(segment)
            else:
                lines += self._update(segment, now)
        del self._buf[:pos]
        while len(self._buf) >= self._max_line:
            lines.append(bytes(self._buf[:self._max_line]))
            del self._buf[:self._max_line]
            self._after_cr = False
        return lines

    def flush_due(self, now: float) -> list[bytes]:
        """The held-back update, if its interval has passed."""
        due = self.next_flush
        if due is None or now < due:
            return []
        line, self._pending, self._last_update = self._pending, None, now
        return [line]

    def finish(self) -> list[bytes]:
        """End of stream: whatever is left, as a last line."""
        if self._buf:
            lines = [bytes(self._buf)]
        elif self._pending is not None:
            lines = [self._pending]
        else:
            lines = []
        self._buf.clear()
        self._pending = None
        return lines

    def _update(self, segment: bytes, now: float) -> list[bytes]:
        self._after_cr = True
        if not segment:
            return []
        if self._last_update is None or now - self._last_update >= self._interval:
            self._pending, self._last_update = None, now
            return [segment]
        self._pending = segment
        return []

    def _end_line(self, segment: bytes) -> list[bytes]:
        if segment:
            lines = [segment]
        elif self._after_cr:
            lines = [] if self._pending is None else [self._pending]
        else:
            lines = [b""]
        self._pending, self._last_update, self._after_cr = None, None, False
        return lines


class Console:
    """The launcher's stdout and stderr; every line is written in one call and flushed.

    A consumer that goes away (a closed pipe) silences that stream instead of
    stopping the launcher, which still has workers to supervise.
    """

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO):
        self._streams = {"stdout": stdout, "stderr": stderr}

    def write_line(self, stream: str, prefix: bytes, line: bytes) -> None:
        out = self._streams.get(stream)
        if out is None:
            return
        try:
            out.write(prefix + line + b"\n")
            out.flush()
        except (BrokenPipeError, ValueError):
            self._streams[stream] = None

    def info(self, text: str) -> None:
        """A message of the launcher itself, on stderr."""
        for line in text.splitlines() or [""]:
            self.write_line("stderr", b"[launch] ", line.encode("utf-8", "replace"))


class OutputStream:
    """One worker pipe (stdout or stderr): lines to the console, bytes to a log file.

    Args:
        console: where prefixed lines go.
        stream: `"stdout"` or `"stderr"`, the launcher stream to write to.
        label: the worker's label; lines are prefixed with `[label] `.
        visible: False to keep the lines off the console (they still reach the
            log file, the tail and `watch`).
        log: a binary file receiving the raw bytes, or None.
        watch: a pattern; the first line matching it is kept in `watch_hit`.
        hide: says which lines to keep off the console (they still reach the log
            file, the tail and `watch`); they are counted in `hidden`.
    """

    def __init__(self, console: Console, stream: str, label: str, *, visible: bool = True,
                 log: BinaryIO | None = None, watch: re.Pattern[str] | None = None,
                 hide: Callable[[str], bool] | None = None):
        self._console = console
        self._stream = stream
        self._prefix = f"[{label}] ".encode()
        self._visible = visible
        self._log = log
        self._watch = watch
        self._hide = hide
        self._splitter = LineSplitter()
        self.hidden = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.watch_hit: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        if self._log is not None:
            self._log.write(data)
            self._log.flush()
        self._emit(self._splitter.feed(data, now))

    def flush_due(self, now: float) -> None:
        self._emit(self._splitter.flush_due(now))

    def close(self) -> None:
        self._emit(self._splitter.finish())
        if self._log is not None:
            self._log.close()

    def _emit(self, lines: list[bytes]) -> None:
        for line in lines:
            text = line.decode("utf-8", "replace")
            self.tail.append(text)
            if self._watch is not None and self.watch_hit is None and self._watch.search(text):
                self.watch_hit = text
            if not self._visible:
                continue
            if self._hide is not None and self._hide(text):
                self.hidden += 1
                continue
            self._console.write_line(self._stream, self._prefix, line)
