"""Every failure maps to a documented exit code with one line; tracebacks only with --debug."""

from __future__ import annotations

import errno
import logging
import sys

import pytest

from flows import exits
from pipelines.config import ConfigError
from pipelines.download.stage import DownloadResult, SourceDownload
from pipelines.errors import InputError
from stores.lease import LeaseHeld
from stores.ledger import LedgerConflict
from stores.workspace import OutsideWorkspace


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (LedgerConflict("x"), 3),
        (InputError("x"), 4),
        (FileNotFoundError("x"), 4),
        (OSError(errno.ENOSPC, "No space left on device", "/ws/shards/00001.tar"), 5),
        (OSError(errno.EROFS, "Read-only file system"), 5),
        (RuntimeError("boom"), 1),
        (KeyError("k"), 1),
        (LeaseHeld("x"), 6),
        (OutsideWorkspace("x"), 4),
    ],
)
def test_exit_codes(error: Exception, code: int) -> None:
    assert exits.exit_code(error) == code
    assert "\n" not in exits.message(error)


def test_storage_and_unexpected_messages_say_what_to_do() -> None:
    full = exits.message(OSError(errno.ENOSPC, "No space left on device", "/ws/shards/00001.tar"))
    assert "No space left on device" in full and "/ws/shards/00001.tar" in full and "rerun" in full
    assert "--debug" in exits.message(RuntimeError("boom"))


def test_partial_results() -> None:
    def source(failed: list[str]) -> SourceDownload:
        return SourceDownload(
            source="s",
            output="o",
            shards=2,
            new_shards=2,
            failed_shards=failed,
            attempted=4,
            succeeded=3,
            failed=1,
            images_per_second=None,
        )

    assert exits.partial(DownloadResult(sources=[source([])], seconds=1.0)) is None
    assert "s" in exits.partial(DownloadResult(sources=[source(["00001"])], seconds=1.0))


def test_the_console_leaves_tracebacks_out_but_keeps_them_for_other_handlers() -> None:
    try:
        raise ValueError("deep")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "it failed", None, sys.exc_info())
    assert exits.BriefFormatter("%(message)s").format(record) == "it failed"
    assert "Traceback" in logging.Formatter("%(message)s").format(record)
