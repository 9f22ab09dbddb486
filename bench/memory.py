"""Peak memory of this process and its children (PSS: shared pages split between processes), for benchmarks."""

from __future__ import annotations

import contextlib
import threading

import psutil


class PeakMemory:
    """Samples the summed PSS of this process tree every `every` seconds while in the `with` block."""

    def __init__(self, every: float = 0.2) -> None:
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process may end between listing and reading
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
