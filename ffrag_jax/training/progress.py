"""Progress of a long loop, for a person at a terminal and for a log file alike.

In a terminal: a tqdm bar, and log lines printed above it (never through it). Without one
(Slurm, nohup, a pipe): a log line with the rate and the ETA at most every ``every_s``
seconds and at the end. Either way a step can report progress inside itself
(:meth:`Progress.within`: a federated round's clients, one by one), so a round that takes
minutes does not look stuck.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import time

from absl import logging
from tqdm import tqdm


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class _TqdmStream:
    """A stream that writes through ``tqdm.write``: log lines go above the bar."""

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def _logs_above_the_bar():
    handler = logging.get_absl_handler().python_handler
    stream = handler.stream
    handler.stream = _TqdmStream()
    try:
        yield
    finally:
        handler.stream = stream


class Progress:
    """``with Progress("rounds", total=5, initial=2, unit="round") as p: ... p.update(3)``."""

    def __init__(self, desc: str, *, total: int, initial: int = 0, unit: str = "step",
                 every_s: float = 30.0, terminal: bool | None = None):
        self.desc, self.total, self.initial, self.unit = desc, total, initial, unit
        self.done, self.every_s = initial, every_s
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = None
        self._stack = contextlib.ExitStack()
        self._started = self._last_line = time.perf_counter()
        self._postfix: dict = {}

    def __enter__(self) -> Progress:
        if self.terminal:
            self._bar = tqdm(total=self.total, initial=self.initial, desc=self.desc,
                             unit=self.unit, dynamic_ncols=True, file=sys.stderr)
            self._stack.enter_context(_logs_above_the_bar())
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        self._stack.close()

    def rate(self) -> float:
        """Finished steps per second in this process."""
        elapsed = time.perf_counter() - self._started
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> str:
        rate = self.rate()
        return _duration((self.total - self.done) / rate) if rate > 0 else "?"

    def show(self, **values) -> None:
        """Host values to show beside the progress from now on (``loss=0.41``)."""
        self._postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(**{k: _short(v) for k, v in self._postfix.items()},
                                  refresh=False)

    def update(self, done: int) -> None:
        """``done`` steps finished (of ``total``)."""
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        self.done = done
        now = time.perf_counter()
        if self._bar is None and (now - self._last_line >= self.every_s or done == self.total):
            self._last_line = now
            shown = "  ".join(f"{k} {_short(v)}" for k, v in self._postfix.items())
            logging.info("%s %d/%d (%.0f%%)  %.3g %s/s  ETA %s  %s", self.desc, done,
                         self.total, 100 * done / max(self.total, 1), self.rate(), self.unit,
                         self.eta(), shown)

    def within(self, what: str, done: int, total: int) -> None:
        """Progress inside the current step (``what``: "client 1:legal", ``done`` of
        ``total`` of its parts)."""
        if self._bar is not None:
            self._bar.set_description_str(f"{self.desc} {self.done + 1}: {what} {done}/{total}")
            if done == total:
                self._bar.set_description_str(self.desc)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            logging.info("%s %d/%d: %s %d/%d  (elapsed %s)", self.desc, self.done + 1,
                         self.total, what, done, total, _duration(now - self._started))


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
