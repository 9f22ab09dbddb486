"""Leases: one run at a time writes a stage's output, on a local disk or an object store (a file with a heartbeat)."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import posixpath
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from stores.workspace import Workspace

log = logging.getLogger(__name__)
LEASES = "leases"  # ws/leases/<stage>/<output>.json
STALE_SECONDS = 120.0  # a lease whose heartbeat is older is taken over (its run died without releasing it)
SETTLE_SECONDS = 0.5  # object stores: how long a taker waits before it reads its lease back (last writer wins)


class LeaseHeld(RuntimeError):
    """Another run holds the lease of the output this run would write."""


class Lease:
    """A held lease: its file is rewritten every `stale_seconds / 4` while the run lasts."""

    def __init__(self, ws: Workspace, path: str, body: dict[str, Any], stale_seconds: float) -> None:
        self.ws, self.path, self.body, self.stale_seconds = ws, path, body, stale_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {posixpath.basename(path)}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_seconds / 4):
            try:
                current = _read(self.ws, self.path)
                if current is None or current.get("token") != self.body["token"]:
                    self.lost = True
                    log.error("lease %s was taken over by another run (this run's heartbeat stalled)", self.path)
                    return
                self.body["heartbeat"] = time.time()
                _write(self.ws, self.path, self.body)
            except OSError as e:  # a storage hiccup: the next beat tries again, well before the lease is stale
                log.warning("lease %s: heartbeat failed: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this run's."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(OSError):
            current = _read(self.ws, self.path)
            if current is not None and current.get("token") == self.body["token"]:
                self.ws.remove(self.path)


def lease_path(ws: Workspace, stage: str, output: str) -> str:
    """Where the lease of one stage output lives."""
    return ws.path(LEASES, stage, f"{output}.json")


@contextlib.contextmanager
def lease(ws: Workspace, stage: str, output: str, stale_seconds: float = STALE_SECONDS) -> Iterator[Lease]:
    """Hold the lease of a stage output while inside; raises LeaseHeld when a live run holds it.

    A lease is stale, and taken over, when its heartbeat is older than `stale_seconds`, or at once when its holder
    ran on this host and its process is gone.
    """
    path = lease_path(ws, stage, output)
    body = {
        "stage": stage,
        "output": output,
        "token": secrets.token_hex(8),
        "owner": _owner(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(posixpath.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "heartbeat": time.time(),
    }
    held = _acquire(ws, path, body, stale_seconds)
    held._thread.start()
    try:
        yield held
    finally:
        held.release()


def _acquire(ws: Workspace, path: str, body: dict[str, Any], stale_seconds: float) -> Lease:
    for _ in range(3):  # a lost race for a stale lease looks again
        current = _read(ws, path)
        if current is not None and not _stale(current, stale_seconds):
            raise LeaseHeld(_held_message(path, current, stale_seconds))
        if ws.is_local:
            if current is not None and not _take_over_local(path, current):
                continue
            if _create_local(path, body):
                return Lease(ws, path, body, stale_seconds)
            continue
        _write(ws, path, body)  # an object store has no exclusive create: write, wait, and see who won
        time.sleep(SETTLE_SECONDS)
        won = _read(ws, path)
        if won is not None and won.get("token") == body["token"]:
            return Lease(ws, path, body, stale_seconds)
    current = _read(ws, path) or {}
    raise LeaseHeld(_held_message(path, current, stale_seconds))


def _create_local(path: str, body: dict[str, Any]) -> bool:
    """Create the lease file with its content in one step (a hard link fails when the name exists)."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.new-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        json.dump(body, f)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)
    return True


def _take_over_local(path: str, stale: dict[str, Any]) -> bool:
    """Move a stale lease aside (one taker's rename wins), then delete it; False when another taker was first."""
    aside = f"{path}.stale-{secrets.token_hex(4)}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # released (or taken over and released) meanwhile: the create decides
    with open(aside) as f:
        text = f.read()
    os.remove(aside)
    try:
        moved = json.loads(text)
    except ValueError:
        moved = {}
    if moved.get("token") != stale.get("token"):  # a live lease replaced the stale one meanwhile: put it back
        _create_local(path, moved)
        return False
    log.warning("taking over the stale lease of %s (%s)", path, _holder(stale))
    return True


def _stale(body: dict[str, Any], stale_seconds: float) -> bool:
    if time.time() - float(body.get("heartbeat", 0)) > stale_seconds:
        return True
    return body.get("host") == socket.gethostname() and not _alive(int(body.get("pid", 0)))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(body: dict[str, Any]) -> str:
    return f"pid {body.get('pid')} of {body.get('owner')} on {body.get('host')}, started {body.get('started_at')}"


def _held_message(path: str, body: dict[str, Any], stale_seconds: float) -> str:
    age = time.time() - float(body.get("heartbeat", 0))
    return (
        f"{body.get('stage')} output {body.get('output')!r} is being written by another run ({_holder(body)}: "
        f"{body.get('command') or '?'}; last heartbeat {age:.0f} s ago). Wait for it to finish; a run that died "
        f"is taken over once its heartbeat is {stale_seconds:.0f} s old (lease {path})"
    )


def _owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _read(ws: Workspace, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(ws.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or empty lease (a writer died mid-write): treat as stale
        return {}


def _write(ws: Workspace, path: str, body: dict[str, Any]) -> None:
    ws.write_bytes(path, json.dumps(body).encode())
