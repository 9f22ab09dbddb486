"""Prefect flows and tasks over pipelines.*.run, and the ibllm command-line interface."""

import os

# Before Prefect is imported: the temporary server `ibllm demo` starts may take longer than Prefect's 20 s on a busy
# 2-core laptop (seen while other work ran); waiting longer costs nothing when it is up sooner.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
