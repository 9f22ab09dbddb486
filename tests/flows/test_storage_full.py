"""A full or read-only workspace ends a command with exit 5 (7: shards left incomplete) in one line; after space
is freed a rerun completes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs in its own user and mount namespace (`unshare -rm`): a small tmpfs is the workspace, remounted bigger or
# read-only between commands. Each command prints `rc=N` and its last stderr line.
SCRIPT = textwrap.dedent("""
    set -u
    D=$(mktemp -d)
    mount -t tmpfs -o size=300k tmpfs "$D" || exit 99
    run() {
        "$PY" -m flows.cli "$@" --workspace "$D/ws" --set synthetic.count=40 --set synthetic.bad_fraction=0 \
            --set download.samples_per_shard=5 --set download.processes=1 >/dev/null 2>"$D.err"
        echo "rc=$? $(grep -c Traceback "$D.err") $(tail -n 1 "$D.err")"
    }
    run synthetic
    mount -o remount,size=64m "$D"
    run synthetic
    mount -o remount,ro "$D"
    run ingest
    mount -o remount,rw "$D"
    run ingest
    run curate >/dev/null
    mount -o remount,size=$(( $(du -sk "$D" | cut -f1) + 60 ))k "$D"  # room for a few of the 8 shards
    run download
    mount -o remount,size=64m "$D"
    run download
    find "$D/ws/leases" -type f | wc -l
""")


def _namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm and tmpfs mounts (user namespaces)")
def test_disk_full_and_read_only_workspaces_exit_5_and_a_rerun_completes(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        ["unshare", "-rm", "bash", "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        env={
            "PATH": "/usr/bin:/bin",
            "PY": sys.executable,
            "HOME": str(tmp_path),
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_AUTH_MODE": "disabled",
        },
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 7, proc.stdout + proc.stderr
    full, rerun, read_only, again, download_full, download_again, leases = lines
    assert full.startswith("rc=5 0 ibllm: storage refused the write (No space left on device)"), full
    assert rerun.startswith("rc=0 0"), rerun
    assert read_only.startswith("rc=5 0 ibllm: storage refused the write (Read-only file system)"), read_only
    assert again.startswith("rc=0 0"), again
    # a download that filled the disk says so and exits non-zero: storage (5) or shards left incomplete (7)
    assert download_full.startswith(("rc=5 0 ibllm: storage refused", "rc=7 0 ibllm: shards left incomplete")), (
        download_full
    )
    assert download_again.startswith("rc=0 0"), download_again  # the rerun completes every shard
    assert leases == "0"  # every command released its leases, failed ones included
