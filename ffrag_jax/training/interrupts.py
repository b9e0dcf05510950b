"""A stop requested by a signal (Ctrl-C, a scheduler's SIGTERM), remembered.

The launcher's handler records the request here and, unless a critical section is open,
raises ``KeyboardInterrupt`` at once; the trainer checks the record at every step boundary.
A ``KeyboardInterrupt`` raised while a library is inside a ``try`` that swallows it (it can
land in any bytecode) would otherwise be lost and the run would go on to the end; the recorded
request still stops it one step later.

Inside :func:`deferred` (a checkpoint being handed to orbax's background threads) the handler
only records: an exception landing between orbax's lock acquisitions and thread starts can
leave a save that never finishes, and the exit then waits on it forever. The request is raised
when the section ends.
"""

from __future__ import annotations

import contextlib

_requested: list[str] = []
_deferring: list[bool] = []


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


def deferring() -> bool:
    """Whether a signal arriving now must only be recorded (see :func:`deferred`)."""
    return bool(_deferring)


@contextlib.contextmanager
def deferred():
    """A section a signal does not cut: a stop asked inside it is raised when it ends."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if not _deferring:
        check()
