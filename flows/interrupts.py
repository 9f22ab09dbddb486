"""Ctrl-C and SIGTERM for the command line: a stop at a safe point first, a forced end on a second signal or 30 s."""

from __future__ import annotations

import _thread
import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from pipelines import stop

GRACE_S = 10.0  # after a first signal: the stage's own safe point, then a KeyboardInterrupt in the main thread
DEADLINE_S = 30.0  # after a first signal: the process ends whatever it was doing
SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupts:
    """Watches SIGINT and SIGTERM from a thread of its own, so that no lock is ever taken in a signal handler.

    The handlers only count (the C-level wakeup fd and our Python handler both report a signal: whichever still
    works after a library replaced the other). The watcher asks the stage to stop (`pipelines.stop`); a stage that
    checks at its safe points ends there; after GRACE_S (at once where the code said so: a blocking read) the main
    thread gets a KeyboardInterrupt; after DEADLINE_S,
    or at a second signal, the process ends at once with the line of what was kept. A stop the program handled and
    cleared (a chat's cancelled answer) stands the watcher down.
    """

    def __init__(self, grace: float = GRACE_S, deadline: float = DEADLINE_S) -> None:
        self.grace, self.deadline = grace, deadline
        self.signum: int | None = None  # the first signal of the current stop
        self._hits = 0  # signals our Python handler saw
        self._raise = False  # the watcher asks the handler to raise KeyboardInterrupt in the main thread
        self._done = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._raise:  # the watcher's own nudge (`_thread.interrupt_main`), not a signal from outside
            self._raise = False
            raise KeyboardInterrupt
        self._hits += 1  # no lock, no I/O: the watcher thread does the rest

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Handle the signals while the block runs (only in the main thread; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        stop.clear()
        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        watcher = threading.Thread(target=self._watch, name="ibllm-interrupts", daemon=True)
        watcher.start()
        try:
            with stop.watched():
                yield self
        finally:
            self._done = True
            watcher.join(timeout=1)
            signal.set_wakeup_fd(old_fd)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(self._read)
            os.close(self._write)
            stop.clear()

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C, 143 for SIGTERM."""
        return EXIT.get(self.signum or signal.SIGINT, 130)

    def _watch(self) -> None:
        by_fd, nudges, seen, first, nudged = 0, 0, 0, 0.0, False
        while not self._done:
            ready, _, _ = select.select([self._read], [], [], 0.05)
            if ready:
                data = os.read(self._read, 64)
                by_fd += sum(1 for b in data if b in SIGNALS)
                self.signum = self.signum or next((b for b in data if b in SIGNALS), None)
            count = max(by_fd - nudges, self._hits)  # a nudge is written to the wakeup fd too
            if count > seen:
                if seen and stop.requested():
                    self._end("forced by a second signal")
                seen, first, nudged = count, time.monotonic(), False
                self.signum = self.signum or signal.SIGINT
                stop.request()
                _say("ibllm: stopping at the next safe point (Ctrl-C again to stop at once)")
            elif first and not stop.requested():  # handled and cleared: work goes on
                first, self.signum, seen = 0.0, None, count
            elif first:
                waited = time.monotonic() - first
                if (waited > self.grace or stop.interruptible()) and not nudged:
                    nudged, nudges, self._raise = True, nudges + 1, True
                    _thread.interrupt_main(signal.SIGINT)
                if waited > self.deadline:
                    self._end(f"forced after {self.deadline:.0f} s")

    def _end(self, why: str) -> None:
        _say(f"ibllm: interrupted ({why}); {stop.kept()}")
        os._exit(self.exit_code)


def _say(line: str) -> None:
    """A line on stderr written directly (no logging lock, which an interrupted thread may hold)."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())
