"""The exit code and one-line message of every failure a user can cause or meet (the README's table)."""

from __future__ import annotations

import logging
from typing import Any

from model.errors import ModelInputError
from pipelines.config import ConfigError
from pipelines.errors import STORAGE_ERRNOS, Diverged, InputError
from pipelines.paths import WorkspaceError
from stores.errors import StoreInputError
from stores.lease import LeaseHeld
from stores.ledger import LedgerConflict

OK = 0
UNEXPECTED = 1  # a bug: the one line says so; --debug shows the traceback
CONFIG = 2  # invalid configuration (a workspace that cannot be created included)
SETTINGS = 3  # the output was made with other settings (see "Workspace and ledger"); --force redoes it
INPUT = 4  # bad or missing input: a file, field or value named in the message
STORAGE = 5  # the storage refused to write: full, read-only, no permission
LOCKED = 6  # another run is writing the same stage output (its lease is live); wait for it
PARTIAL = 7  # the command ran, but some of its work failed (failed requests, shards left incomplete)
DIVERGED = 8  # training diverged (a non-finite loss or gradient, a loss spike); the newest checkpoint is good


def exit_code(error: BaseException) -> int:
    """The exit code of an exception that ended a command."""
    if isinstance(error, ConfigError | WorkspaceError):
        return CONFIG
    if isinstance(error, LedgerConflict):
        return SETTINGS
    if isinstance(error, LeaseHeld):
        return LOCKED
    if isinstance(error, Diverged):
        return DIVERGED
    if isinstance(error, InputError | ModelInputError | StoreInputError | FileNotFoundError):
        return INPUT
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        return STORAGE
    return UNEXPECTED


def message(error: BaseException, workspace: str | None = None) -> str:
    """The line printed for an exception that ended a command (a storage error without a file names `workspace`)."""
    code = exit_code(error)
    if code == STORAGE:
        assert isinstance(error, OSError)
        where = f": {error.filename or workspace}" if error.filename or workspace else ""
        return (
            f"storage refused the write ({error.strerror or error}){where}; free space or fix permissions, then rerun"
        )
    if code == UNEXPECTED:
        return f"unexpected error: {type(error).__name__}: {error} (rerun with --debug for the traceback)"
    return str(error)


def partial(result: Any) -> str | None:
    """Why a result that came back is only partly done (some requests or shards failed), else None."""
    errors = getattr(result, "errors", None)
    if isinstance(errors, int) and errors > 0:
        return f"{errors} request(s) failed: see their error entries"
    incomplete = [s for s in getattr(result, "sources", []) or [] if getattr(s, "failed_shards", None)]
    if incomplete:
        return f"shards left incomplete in {', '.join(s.source for s in incomplete)}: rerun to retry them"
    return None


class BriefFormatter(logging.Formatter):
    """The console's formatter without --debug: records keep their message, their tracebacks are left out (other
    handlers, such as Prefect's, still get them)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
