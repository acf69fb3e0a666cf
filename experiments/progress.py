"""A small tqdm-like progress display for training loops.

On a terminal it redraws one line in place (``step/total``, a bar, loss, steps/s, ETA);
elsewhere (a log file, CI, ``enabled=False``) it prints a plain line at most every
``interval_s`` seconds, and always for the first and the last step::

    bar = Progress(total=1000, initial=resumed_step)
    for step in range(resumed_step + 1, 1001):
        ...
        bar.update(step, loss=2.31)
    bar.close()

Steps/s and the ETA are measured from the first ``update`` on, so a first step that includes
compilation does not skew them.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 20


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress of ``total`` steps, starting after ``initial`` already done (a resume).

    Args:
      total: the step count at which the loop ends.
      initial: steps already done before this process started.
      enabled: live redrawing on a terminal; when False, or when ``stream`` is not a
        terminal, periodic plain lines instead.
      stream: where to write (default ``sys.stderr``).
      interval_s: seconds between plain lines (live redraws are limited to 10 per second).
      desc: a label at the start of the line.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        desc: str = "train",
    ):
        self.total, self.desc = total, desc
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.live = enabled and isatty()
        self.interval_s = 0.1 if self.live else interval_s
        self.step = initial
        self.postfix: dict[str, float] = {}
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self._last_print = -float("inf")
        self._width = 0

    def rate(self) -> float | None:
        """Steps per second since the first update, or None before two updates."""
        if self._first is None or self.step <= self._first[0]:
            return None
        return (self.step - self._first[0]) / max(time.perf_counter() - self._first[1], 1e-9)

    def line(self) -> str:
        """The current status line."""
        head = f"{self.desc} {self.step:>{len(str(self.total))}}/{self.total}"
        fraction = min(self.step / max(self.total, 1), 1.0)
        if self.live:
            filled = int(BAR_WIDTH * fraction)
            head += " [" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
        parts = [f"{head} {100 * fraction:3.0f}%"]
        parts += [f"{key} {value:.4g}" for key, value in self.postfix.items()]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.3g} step/s")
            parts.append(f"ETA {format_seconds((self.total - self.step) / rate)}")
        return " | ".join(parts)

    def update(self, step: int, **postfix: float) -> None:
        """Record that ``step`` steps are done; ``postfix`` values (e.g. loss) are shown."""
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        self.step = step
        self.postfix.update(postfix)
        first_or_last = step == self._first[0] or step >= self.total
        if first_or_last or now - self._last_print >= self.interval_s:
            self._print()
            self._last_print = now

    def write(self, message: str) -> None:
        """Print ``message`` on its own line without garbling the live line."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(message + "\n")
        if self.live and self._width:
            self.stream.write(self.line())
        self.stream.flush()

    def close(self) -> None:
        """End the live line (the last state stays on screen)."""
        if self.live and self._width:
            self._print()
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _print(self) -> None:
        line = self.line()
        if self.live:
            pad = " " * max(self._width - len(line), 0)
            self.stream.write("\r" + line + pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
