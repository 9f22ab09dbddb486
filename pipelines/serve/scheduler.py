"""One thread owns the generation engine: requests from any thread, stepped together, their tokens streamed back."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipelines.errors import InputError
from pipelines.runtime.answerer import Answerer
from pipelines.runtime.inputs import Request

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests than the server holds (HTTP 429)."""


@dataclass
class Ticket:
    """A request handed to the scheduler; `on_text(text so far)` and `on_done(finish | error)` are called from its
    thread as tokens are decided (the HTTP side moves them onto its event loop)."""

    request: Request
    use_cache: bool | None
    on_text: Callable[[str], None] | None  # None: no text until the end (nothing is decoded per token)
    on_done: Callable[[str | None, Exception | None], None]  # InputError: the request's fault
    on_start: Callable[[], None] = lambda: None  # prepared (inputs read, prompt fits) and queued for a slot
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    job: int | None = None
    cancelled: str | None = None  # why it was stopped before its end: "cancelled" (a client gone) or "timeout"


class Scheduler:
    """Continuous batching behind a bounded queue: at most `max_queue` requests waiting or decoding."""

    def __init__(self, answerer: Answerer, max_queue: int = 64) -> None:
        self.answerer, self.max_queue = answerer, max_queue
        self._inbox: queue.Queue[Ticket | None] = queue.Queue()
        self._jobs: dict[int, Ticket] = {}
        self._held = 0  # tickets accepted and not finished
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # outcome -> count
        self.tokens_total = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ibllm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    @property
    def held(self) -> int:
        """Requests waiting or decoding."""
        return self._held

    def submit(self, ticket: Ticket) -> None:
        """Hand a request over; QueueFull when `max_queue` are held already."""
        with self._lock:
            if self._held >= self.max_queue:
                self.requests["rejected"] += 1
                raise QueueFull(f"{self._held} requests are queued or decoding (serve.max_queue {self.max_queue})")
            self._held += 1
        self._inbox.put(ticket)

    def cancel(self, ticket: Ticket, outcome: str = "cancelled") -> None:
        """Stop a request (a client gone, or "timeout"); its slot goes to the next, its outcome is counted once."""
        ticket.cancelled = outcome
        self._inbox.put(None)  # wakes the thread, which drops cancelled tickets

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens decided per second over the last `window` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    def close(self) -> None:
        self._inbox.put(None)
        self._closed = True

    # ------------------------------------------------------------------ the engine's thread

    def _run(self) -> None:
        engine = self.answerer.engine
        while not self._closed:
            block = not engine.pending()
            try:
                item = self._inbox.get(block=block, timeout=None if block else 0)
                while True:
                    if item is not None:
                        self._admit(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            self._drop_cancelled()
            if engine.pending():
                try:
                    self._step()
                except Exception as e:  # the engine failed (out of memory, ...): fail what it held, keep serving
                    log.exception("a generation step failed")
                    for job, ticket in list(self._jobs.items()):
                        engine.cancel(job)
                        del self._jobs[job]
                        self._end(ticket, None, e)

    def _admit(self, ticket: Ticket) -> None:
        try:
            ticket.job, ticket.prompt_tokens = self.answerer.submit(ticket.request, ticket.use_cache)
        except Exception as e:  # InputError: the request's fault; anything else (an encoder failure) is logged
            if not isinstance(e, InputError):
                log.exception("a request could not be prepared")
            self._end(ticket, None, e)
            return
        self._jobs[ticket.job] = ticket
        ticket.on_start()

    def _drop_cancelled(self) -> None:
        for job, ticket in list(self._jobs.items()):
            if ticket.cancelled:
                self.answerer.engine.cancel(job)
                del self._jobs[job]
                self._release(ticket.cancelled)

    def _step(self) -> None:
        events = self.answerer.engine.step()
        decided = 0
        for event in events:
            ticket = self._jobs.get(event.id)
            if ticket is None:
                continue
            if event.token is not None:
                decided += 1
                ticket.tokens.append(event.token)
            if ticket.on_text is not None and (event.token is not None or event.done) and ticket.tokens:
                text = self.answerer.tokenizer.decode(ticket.tokens)
                if event.done or not text.endswith("\ufffd"):  # hold back a character whose bytes are not all here
                    ticket.on_text(text)
            if event.done:
                del self._jobs[event.id]
                self._end(ticket, "stop" if event.token is None else "length", None)
        self.tokens_total += decided
        self._recent.append((time.monotonic(), decided))
        while self._recent and time.monotonic() - self._recent[0][0] > 60:
            self._recent.popleft()

    def _end(self, ticket: Ticket, finish: str | None, error: Exception | None) -> None:
        self._release("error" if error else "ok")
        try:
            ticket.on_done(finish, error)
        except Exception:  # a client's callback must not stop the engine
            log.exception("a request's completion callback failed")

    def _release(self, outcome: str) -> None:
        with self._lock:
            self._held -= 1
            self.requests[outcome] += 1
