"""A stop requested by a signal (Ctrl-C, a scheduler's SIGTERM), remembered.

The launcher's handler raises ``KeyboardInterrupt`` at once and also records the request
here; the trainer checks it at every step boundary. A ``KeyboardInterrupt`` raised while a
library is inside a ``try`` that swallows it (it can land in any bytecode) would otherwise be
lost and the run would go on to the end; the recorded request still stops it one step later.
"""

from __future__ import annotations

_requested: list[str] = []


def request(name: str) -> None:
    _requested.append(name)


def requested() -> str | None:
    """The first signal that asked the run to stop, or None."""
    return _requested[0] if _requested else None


def reset() -> None:
    """Forgets an earlier request (a new run in the same process starts clean)."""
    _requested.clear()


def check() -> None:
    """Raises ``KeyboardInterrupt`` when a stop was requested."""
    if _requested:
        raise KeyboardInterrupt(_requested[0])
