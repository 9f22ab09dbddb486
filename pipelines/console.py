"""What long stages print on the console: one progress line per interval, third-party chatter kept down."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)
VERBOSE_ENV = "IBLLM_VERBOSE"  # "1": everything third-party libraries print (set by `ibllm --verbose`)
INTERVAL_ENV = "IBLLM_PROGRESS_SECONDS"  # seconds between progress lines (default 20)


# What img2dataset prints that a user does not need: its set-up lines, its advice to watch bwm-ng, two lines per
# shard, and its bar of shards (the download stage prints its own progress line per interval instead).
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")  # what differs between repeats of one message
IMG2DATASET_CHATTER = (
    r"^Starting the downloading of this file",
    r"^Sharding file number \d+ of \d+",
    r"^File sharded in \d+ shards",
    r"^Downloading starting now, check your bandwidth",
    r"^(worker|total)\s+- success:",
    r"^\s*\d+it \[",
)
# What other libraries log at INFO that says nothing to a user: Prefect's lines at each flow or task run's start and
# end (a stage's own result line says it ran; failures are warnings and errors, and stay).
LOG_CHATTER = (r"^Finished in state Completed\(\)$", r"^Beginning (sub)?flow run ", *IMG2DATASET_CHATTER)
QUIET_LOGGERS = ("faiss.loader", "matplotlib", "autofaiss", "ray", "httpx", "httpcore")  # WARNING and up only


class ChatterFilter(logging.Filter):
    """A handler filter dropping records whose message matches one of the patterns (img2dataset's prints arrive as
    log records under Prefect's `log_prints`)."""

    def __init__(self, patterns: Iterable[str] = LOG_CHATTER) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not self.pattern.search(record.getMessage())


def quiet_console(is_verbose: bool) -> None:
    """Set the console's level of detail for this process and the ones it starts (Ray workers, img2dataset's
    processes): everything with `is_verbose`; else warnings of QUIET_LOGGERS, no chatter, no third-party bars."""
    os.environ[VERBOSE_ENV] = "1" if is_verbose else "0"
    if is_verbose:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is first imported (here, and in children)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ChatterFilter) for f in handler.filters):
            handler.addFilter(ChatterFilter())


def verbose() -> bool:
    """True when the user asked for everything (`--verbose`): nothing is filtered."""
    return os.environ.get(VERBOSE_ENV) == "1"


def interval() -> float:
    """Seconds between two progress lines of one stage."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "20")))
    except ValueError:
        return 20.0


class Progress:
    """A progress line of a long stage at most once per interval, whatever the engine (a short stage prints none:
    its result says what it did).

    Example:
        progress = Progress(log, "extract")
        progress.update(images, total, "images")  # "extract: 290/2048 images, about 1m40s left", every 10 s
    """

    def __init__(self, logger: logging.Logger, what: str, every: float | None = None, start_at: int = 0) -> None:
        self.log, self.what, self.start_at = logger, what, start_at  # start_at: `done` when timing starts (resumes)
        self.every = interval() if every is None else every
        self.start = self._last = time.perf_counter()

    def due(self) -> bool:
        """True when a line is due (the caller then calls `update`)."""
        return time.perf_counter() - self._last >= self.every

    def update(self, done: int, total: int | None = None, detail: str = "", force: bool = False) -> str | None:
        """Log one line when due (or `force`); returns the line logged, else None."""
        now = time.perf_counter()
        if not force and now - self._last < self.every:
            return None
        self._last = now
        line = self.line(done, total, detail, now - self.start)
        self.log.info("%s", line)
        return line

    def line(self, done: int, total: int | None, detail: str, elapsed: float) -> str:
        """`what: done/total detail, about 1m40s left`."""
        of = f"/{total}" if total else ""
        eta = ""
        if total and self.start_at < done < total:
            eta = f", about {_duration(elapsed * (total - done) / (done - self.start_at))} left"
        return f"{self.what}: {done}{of}{f' {detail}' if detail else ''}{eta}"


@contextlib.contextmanager
def polling(poll: Callable[[], None], every: float = 2.0) -> Iterator[None]:
    """Call `poll` from a thread every `every` seconds while the block runs, and once when it ends: how the
    driver reports on work done elsewhere (img2dataset's processes, Ray Train workers). A failing poll is skipped."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            stopping = stop.wait(every)
            with contextlib.suppress(Exception):  # storage blinked, a file was being replaced: the next poll reads it
                poll()
            if stopping:
                return

    thread = threading.Thread(target=loop, name="ibllm-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 30)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def quiet_ray_data(context: object) -> None:
    """Ray Data's console: warnings only (no execution plans, no progress blocks every 10 s) unless --verbose;
    `context` is the current `ray.data.DataContext`."""
    if verbose():
        return
    from ray.util.debug import log_once

    context.enable_progress_bars = False  # type: ignore[attr-defined]  # our own Progress lines say how far it is
    context.print_on_execution_start = False  # type: ignore[attr-defined]
    log_once("ray_data_progress_manager_disabled")  # taken here: Ray's warning that bars are off is not news
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


@contextlib.contextmanager
def filtered_output(chatter: Iterable[str]) -> Iterator[None]:
    """Drop the lines matching `chatter` (regular expressions) that this process and its children write to fds 1 and
    2 while the block runs (img2dataset's prints come from its own processes); everything else passes through."""
    if verbose():
        yield
        return
    pattern = re.compile("|".join(f"(?:{c})" for c in chatter))
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    read_end, write_end = os.pipe()
    for fd in (1, 2):
        os.dup2(write_end, fd)
    os.close(write_end)
    left_out = [0]  # repeats the pump left out
    pump = threading.Thread(target=_pump, args=(read_end, saved[2], pattern, left_out), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)  # the pipe's last writer closes: the pump drains it and ends
        pump.join(timeout=10)
        for copy in saved.values():
            os.close(copy)
        if left_out[0]:
            log.warning("%d similar line(s) left out (--verbose shows everything)", left_out[0])


def _pump(read_end: int, out: int, pattern: re.Pattern[str], left_out: list[int]) -> None:
    """Copy lines to `out`, leaving out chatter, the frames of tracebacks (their last line, the error, stays) and
    repeats of a line seen before (numbers and addresses aside), counted in `left_out`."""
    seen: set[str] = set()
    in_traceback = False
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            for line in raw.replace(b"\r", b"\n").splitlines(keepends=True):
                text = line.decode(errors="replace")
                if text.startswith("Traceback (most recent call last)"):
                    in_traceback = True
                    continue
                if in_traceback and text[:1].isspace():
                    continue
                in_traceback = False
                if not text.strip() or pattern.search(text):
                    continue
                shape = _NUMBERS.sub("#", text.strip())
                if shape in seen:
                    left_out[0] += 1
                    continue
                seen.add(shape)
                os.write(out, line if line.endswith(b"\n") else line + b"\n")
