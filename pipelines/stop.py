"""A stop asked for from outside (Ctrl-C, SIGTERM): long loops check it at safe points and say how to go on."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_asked = threading.Event()
_notes: list[Callable[[], str | None]] = []
_unwound: list[Callable[[], str | None]] = []  # notes of blocks an interruption left (innermost first)
_at_once: list[bool] = []  # non-empty while the running code may be interrupted at once (see `at_once`)
_watchers: list[bool] = []  # non-empty while a watcher turns signals into stop requests (the command line's)
KEPT = "committed shards are kept; a rerun goes on from there"


class Stopped(KeyboardInterrupt):
    """Raised at a safe point after a stop was asked for (a KeyboardInterrupt: every caller treats it as one)."""


@contextlib.contextmanager
def _raised(flag: list[bool]) -> Iterator[None]:
    """`flag` is raised (non-empty) while the block runs; nested blocks stack."""
    flag.append(True)
    try:
        yield
    finally:
        flag.pop()


def watched() -> contextlib.AbstractContextManager[None]:
    """While the block runs, signals reach the program as stop requests (the command line's watcher says so)."""
    return _raised(_watchers)


def is_watched() -> bool:
    """Whether signals become stop requests now (else a library may handle them its own way)."""
    return bool(_watchers)


def request() -> None:
    """Ask the running stage to stop at its next safe point (called by the command line's signal watcher)."""
    _asked.set()


def clear() -> None:
    """The stop was handled and work goes on (a chat's cancelled answer)."""
    _asked.clear()
    _unwound.clear()


def requested() -> bool:
    """Whether a stop was asked for."""
    return _asked.is_set()


def check() -> None:
    """Raise Stopped when a stop was asked for: call it where stopping loses nothing (between steps, shards)."""
    if _asked.is_set():
        raise Stopped()


def wait(timeout: float | None = None) -> bool:
    """Block until a stop is asked for (True), or `timeout` seconds pass (False)."""
    return _asked.wait(timeout)


def at_once() -> contextlib.AbstractContextManager[None]:
    """While the block runs (a blocking read, say), a stop interrupts it at once: nothing is left half done."""
    return _raised(_at_once)


def interruptible() -> bool:
    """Whether the running code said it may be interrupted at once."""
    return bool(_at_once)


@contextlib.contextmanager
def note(say: Callable[[], str | None]) -> Iterator[None]:
    """While the block runs, `say()` tells what an interruption keeps and how to continue (the newest note wins;
    None: the default). It is called when the command ends interrupted, from any thread."""
    _notes.append(say)
    try:
        yield
    except BaseException:  # the interruption unwinds the block: its note still tells what the command kept
        _unwound.append(say)
        raise
    finally:
        _notes.remove(say)


def kept() -> str:
    """What an interruption now keeps and how to continue: the newest note's line, else the default."""
    for say in [*reversed(_notes), *_unwound]:
        try:
            line = say()
        except Exception:  # a note must never hide the interruption itself
            line = None
        if line:
            return line
    return KEPT
