"""Download outcome queries over the catalog: example URLs per failure reason, retry rounds, what retries rescued."""

from __future__ import annotations

from typing import Any

from stores.catalog import Catalog

# One row per sample and reason it failed with (its last attempt with that reason), the first N per source and
# reason in uid order (a hash: a spread of hosts), with how the sample ended.
FAILURE_EXAMPLES = """
WITH tries AS (SELECT uid, count(*) AS attempts FROM downloads GROUP BY uid),
     failed AS (SELECT source, reason, uid, url, error_message, round FROM downloads WHERE status <> 'success'
                QUALIFY row_number() OVER (PARTITION BY uid, reason ORDER BY round DESC) = 1)
SELECT f.source, f.reason, f.url, f.error_message AS error, f.round, t.attempts,
       CASE WHEN l.status = 'success' THEN 'rescued in round ' || l.round ELSE l.reason END AS final
FROM failed f JOIN tries t USING (uid) JOIN download_latest l USING (uid)
QUALIFY row_number() OVER (PARTITION BY f.source, f.reason ORDER BY f.uid) <= $n
ORDER BY f.source, f.reason, f.uid
"""
RETRY_ROUNDS = """
SELECT source, round, count(*) AS attempted, count(*) FILTER (WHERE status = 'success') AS succeeded,
       count(*) FILTER (WHERE status <> 'success') AS failed,
       count(*) FILTER (WHERE status <> 'success' AND retryable) AS failed_retryable
FROM downloads GROUP BY ALL ORDER BY source, round
"""
# Per reason of the first attempt: how many failed so, went through a retry round, were rescued, still fail.
RETRIES_BY_REASON = """
WITH tries AS (SELECT uid, count(*) AS attempts FROM downloads GROUP BY uid)
SELECT f.source, f.reason AS first_reason, f.retryable, count(*) AS failed,
       count(*) FILTER (WHERE t.attempts > 1) AS retried,
       count(*) FILTER (WHERE l.status = 'success') AS rescued,
       count(*) FILTER (WHERE l.status <> 'success' AND t.attempts > 1) AS still_failing,
       string_agg(DISTINCT l.reason, ', ' ORDER BY l.reason) FILTER (WHERE l.status <> 'success' AND t.attempts > 1)
           AS failing_now_as
FROM downloads f JOIN tries t USING (uid) JOIN download_latest l USING (uid)
WHERE f.round = 0 AND f.status <> 'success'
GROUP BY ALL ORDER BY f.source, failed DESC, first_reason
"""


def failure_examples(cat: Catalog, per_reason: int) -> list[dict[str, Any]]:
    """Up to `per_reason` failed URLs per source and reason, with the error text, attempts and how each ended."""
    return cat.rows(FAILURE_EXAMPLES, {"n": per_reason})


def retry_rounds(cat: Catalog) -> list[dict[str, Any]]:
    """Per source and round (0 the first download): samples attempted, succeeded and failed."""
    return cat.rows(RETRY_ROUNDS)


def retries_by_reason(cat: Catalog) -> list[dict[str, Any]]:
    """Per source and reason of the first failure: failed, retried, rescued, still failing (and as what)."""
    return cat.rows(RETRIES_BY_REASON)
