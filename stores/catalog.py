"""The DuckDB catalog: views over every committed output (metadata, curated lists, funnels, download status)."""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Any

import duckdb

from stores import metrics
from stores.ledger import Ledger
from stores.workspace import Workspace

log = logging.getLogger(__name__)
CATALOG_FILE = "catalog.duckdb"

# img2dataset's error messages -> a reason; retryable reasons are worth another attempt later. An image that arrived
# but was not kept (`failed_to_resize`) is refused for its size or shape, or cannot be decoded, whatever the message.
# `blocked_address`: the fetch refused a non-public address or a scheme other than http(s) (its messages start with
# pipelines/download/guard.py's BLOCKED; urllib's own refusal of a redirect to file: or data: is one too).
REASON_SQL = r"""
CASE
  WHEN status = 'success' THEN 'success'
  WHEN status = 'failed_to_resize' THEN CASE error_message WHEN 'image too small' THEN 'too_small'
       WHEN 'image area too large' THEN 'too_large' WHEN 'aspect ratio too large' THEN 'aspect_ratio' ELSE 'decode' END
  WHEN starts_with(error_message, 'blocked address')
       OR regexp_matches(error_message, '^HTTP Error 30\d: .*Redirection to url .* is not allowed')
       THEN 'blocked_address'
  WHEN error_message ILIKE '%infinite loop%' OR regexp_matches(error_message, '^HTTP Error 30\d') THEN 'redirect_loop'
  WHEN regexp_matches(error_message, '^HTTP Error \d{3}')
       THEN 'http_' || regexp_extract(error_message, '^HTTP Error (\d{3})', 1)
  WHEN error_message ILIKE '%timed out%' OR error_message ILIKE '%timeout%' THEN 'timeout'
  WHEN error_message ILIKE '%X-Robots-Tag%' THEN 'opt_out'
  WHEN error_message ILIKE '%urlopen error%' OR error_message ILIKE '%connection%' OR error_message ILIKE '%errno%'
       OR error_message ILIKE '%name or service not known%' OR error_message ILIKE '%remote end closed%'
       THEN 'connection'
  WHEN error_message = 'image too small' THEN 'too_small'
  WHEN error_message = 'image area too large' OR starts_with(error_message, 'response too large') THEN 'too_large'
  WHEN error_message = 'aspect ratio too large' THEN 'aspect_ratio'
  WHEN error_message = 'hash mismatch' THEN 'hash_mismatch'
  WHEN error_message ILIKE '%decod%' OR error_message ILIKE '%cannot identify%' OR error_message ILIKE '%truncated%'
       THEN 'decode'
  ELSE 'other'
END
"""
RETRYABLE_SQL = "reason IN ('timeout', 'connection', 'http_429') OR regexp_matches(reason, '^http_5\\d\\d$')"
DOWNLOAD_COLUMNS = (
    "uid, source, similarity, caption, url, key, status, error_message, width, height, original_width, original_height"
)
VIEWS = (
    "metadata",
    "curated",
    "funnel",
    "features",
    "feature_failures",
    "evaluations",
    "runs",
    "training_metrics",
    "downloads",
    "download_latest",
)
_DUCK = {"int32": "INTEGER", "int64": "BIGINT", "double": "DOUBLE", "string": "VARCHAR"}
# a run of each stage, from its record (`run.json`), with its best held-out loss from the `evaluations` view
RUNS_SQL = r"""
SELECT CAST(regexp_extract(filename, 'stage(\d+)/[^/]+/run\.json$', 1) AS INTEGER) AS stage,
       regexp_extract(filename, '([^/]+)/run\.json$', 1) AS run_id, status, attempts, steps,
       job.total_steps AS planned_steps, final_loss, h.best_heldout_loss, job.init_checkpoint AS parent, checkpoint,
       try_strptime(left(regexp_extract(filename, '([^/]+)/run\.json$', 1), 15), '%Y%m%d-%H%M%S') AS started
FROM read_json($files, union_by_name = true, filename = true) AS r
LEFT JOIN (SELECT run_id AS id, min(loss) AS best_heldout_loss FROM evaluations WHERE benchmark = 'heldout'
           GROUP BY ALL) AS h ON h.id = regexp_extract(filename, '([^/]+)/run\.json$', 1)
"""
EMPTY = {
    "metadata": "SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS source, NULL::VARCHAR AS url, NULL::VARCHAR AS caption, "
    "NULL::DOUBLE AS similarity, NULL::BIGINT AS width, NULL::BIGINT AS height, NULL::DOUBLE AS punsafe, "
    "NULL::DOUBLE AS pwatermark, NULL::VARCHAR AS language, NULL::VARCHAR AS extra WHERE false",
    "curated": "SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS source, NULL::VARCHAR AS url, NULL::VARCHAR AS caption, "
    "NULL::DOUBLE AS similarity, NULL::BIGINT AS width, NULL::BIGINT AS height WHERE false",
    "funnel": "SELECT NULL::VARCHAR AS source, NULL::VARCHAR AS step, NULL::BIGINT AS rows_in, "
    "NULL::BIGINT AS rows_out, NULL::BIGINT AS removed WHERE false",
    "features": "SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS source, NULL::VARCHAR AS caption, NULL::VARCHAR AS url, "
    "NULL::FLOAT[] AS image_emb, NULL::FLOAT[] AS text_emb, NULL::FLOAT AS clip_score, "
    "NULL::VARCHAR AS encoder_id WHERE false",
    "feature_failures": "SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS source, NULL::VARCHAR AS url, "
    "NULL::VARCHAR AS caption, NULL::VARCHAR AS reason, NULL::VARCHAR AS encoder_id WHERE false",
    "evaluations": "SELECT NULL::VARCHAR AS benchmark, NULL::VARCHAR AS subtask, NULL::BIGINT AS stage, "
    "NULL::VARCHAR AS run_id, NULL::VARCHAR AS checkpoint, NULL::DOUBLE AS score, NULL::BIGINT AS questions, "
    "NULL::DOUBLE AS accuracy, NULL::DOUBLE AS accuracy_plus, NULL::BIGINT AS unparseable, NULL::DOUBLE AS bleu4, "
    "NULL::DOUBLE AS top5, NULL::VARCHAR AS data, NULL::BOOLEAN AS cache, "
    "NULL::BIGINT AS examples, NULL::BIGINT AS tokens, NULL::DOUBLE AS loss, NULL::DOUBLE AS perplexity, "
    "NULL::DOUBLE AS shuffled_loss, NULL::DOUBLE AS grounding_gap, NULL::VARCHAR AS evaluated_at, "
    "NULL::DOUBLE AS seconds, NULL::VARCHAR AS heldout WHERE false",
    "runs": "SELECT NULL::INTEGER AS stage, NULL::VARCHAR AS run_id, NULL::VARCHAR AS status, "
    "NULL::BIGINT AS attempts, NULL::BIGINT AS steps, NULL::BIGINT AS planned_steps, NULL::DOUBLE AS final_loss, "
    "NULL::DOUBLE AS best_heldout_loss, NULL::VARCHAR AS parent, NULL::VARCHAR AS checkpoint, "
    "NULL::TIMESTAMP AS started WHERE false",
    "training_metrics": "SELECT "
    + ", ".join(f"NULL::{_DUCK[str(f.type)]} AS {f.name}" for f in metrics.SCHEMA)
    + " WHERE false",
    "downloads_raw": "SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS source, NULL::DOUBLE AS similarity, "
    "NULL::VARCHAR AS caption, NULL::VARCHAR AS url, NULL::VARCHAR AS key, NULL::VARCHAR AS status, "
    "NULL::VARCHAR AS error_message, NULL::BIGINT AS width, NULL::BIGINT AS height, NULL::BIGINT AS original_width, "
    "NULL::BIGINT AS original_height, NULL::VARCHAR AS output, NULL::VARCHAR AS shard, NULL::INTEGER AS round "
    "WHERE false",
}


def outputs(ws: Workspace, stage: str) -> list[str]:
    """Every output name that has a ledger under `stage`."""
    return sorted(os.path.basename(p.rstrip("/")) for p in ws.glob(ws.ledger(stage, "*")))


def retry_round(output: str) -> int:
    """0 for a source's first download, n for its retry round n (`<source>.retry-NN`)."""
    _, _, tail = output.partition(".retry-")
    return int(tail) if tail else 0


class Catalog:
    """A DuckDB connection whose views list exactly what the ledgers say is committed.

    Views: `metadata`, `curated`, `funnel`, `downloads` (every attempt, with `reason`, `retryable`, `round`,
    `shard`), `download_latest` (one row per uid: its success if any attempt succeeded, else its last failure).
    """

    def __init__(self, ws: Workspace, path: str = ":memory:") -> None:
        self.ws = ws
        self.con = duckdb.connect(path)
        self._search_from_workspace(self.con)
        self.refresh()

    def _search_from_workspace(self, con: duckdb.DuckDBPyConnection) -> None:
        """On a local workspace the views name their files relative to it (`_ref`), found from its folder; on object
        storage DuckDB reads them through the workspace's fsspec filesystem (its endpoint and credentials; DuckDB's
        own httpfs extension would be downloaded at run time)."""
        if self.ws.is_local:
            con.execute("SET file_search_path = $p", {"p": self.ws.base})
        else:
            con.register_filesystem(self.ws.fs)

    def _ref(self, path: str) -> str:
        """A workspace file as the views name it: relative to a local workspace (so a moved or copied workspace keeps
        a working catalog), a full URL on object stores."""
        return posixpath.relpath(path, self.ws.base) if self.ws.is_local else self.ws.as_url(path)

    def _files(self, stage: str, suffix: str) -> list[str]:
        return [
            self._ref(f) for out in outputs(self.ws, stage) for f in Ledger.reader(self.ws, stage, out).files(suffix)
        ]

    def _view(self, name: str, files: list[str], select: str) -> None:
        if files:
            listing = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
            body = select.replace("$files", listing)
        else:
            body = EMPTY[name]
        self._ddl(f"CREATE OR REPLACE VIEW {name} AS {body}")

    def _ddl(self, sql: str) -> None:
        self._statements.append(sql)
        self.con.execute(sql)

    def refresh(self) -> None:
        """Re-read the ledgers and redefine every view."""
        self._statements: list[str] = []
        self._view(
            "metadata", self._files("ingest", ".parquet"), "SELECT * FROM read_parquet($files, union_by_name = true)"
        )
        self._view(
            "curated", self._files("curate", ".parquet"), "SELECT * FROM read_parquet($files, union_by_name = true)"
        )
        self._view("funnel", self._files("curate", "funnel.json"), "SELECT * FROM read_json($files)")
        extracted = self._files("extract", ".parquet")
        parts = [f for f in extracted if os.path.basename(f).startswith("part-")]
        failed = [f for f in extracted if os.path.basename(f).startswith("failures-")]
        self._view("features", parts, "SELECT * FROM read_parquet($files, union_by_name = true)")
        self._view(
            "feature_failures",
            failed,
            "SELECT *, regexp_extract(filename, 'features/([^/]+)/', 1) AS encoder_id "
            "FROM read_parquet($files, filename = true) ",
        )
        held_out = self.ws.glob(self.ws.path("checkpoints", "*", "*", "evaluations", "*.json"))
        benchmarks = self.ws.glob(self.ws.path("evaluations", "*", "*", "record.json"))  # arrays of rows
        evaluations = sorted(self._ref(f) for f in held_out + benchmarks)
        self._view("evaluations", evaluations, "SELECT * FROM read_json($files, union_by_name = true)")
        records = self.ws.glob(self.ws.path("checkpoints", "stage*", "*", "run.json"))
        self._view("runs", sorted(self._ref(f) for f in records), RUNS_SQL)
        segments = self.ws.glob(self.ws.path("checkpoints", "stage*", "*", metrics.METRICS, "steps-*.parquet"))
        self._view(
            "training_metrics",
            sorted(self._ref(f) for f in segments),
            "SELECT * FROM read_parquet($files, union_by_name = true)",
        )
        downloads = []
        for out in outputs(self.ws, "download"):
            for f in Ledger.reader(self.ws, "download", out).files(".parquet"):
                downloads.append((self._ref(f), out))
        if downloads:
            parts = [
                f"SELECT {DOWNLOAD_COLUMNS}, '{out}' AS output, "
                f"regexp_extract(filename, '(\\d+)\\.parquet$', 1) AS shard, {retry_round(out)} AS round "
                f"FROM read_parquet('{f.replace(chr(39), chr(39) * 2)}', filename = true, union_by_name = true)"
                for f, out in downloads
            ]
            self._ddl("CREATE OR REPLACE VIEW downloads_raw AS " + " UNION ALL ".join(parts))
        else:
            self._ddl(f"CREATE OR REPLACE VIEW downloads_raw AS {EMPTY['downloads_raw']}")
        self._ddl(
            f"CREATE OR REPLACE VIEW downloads AS SELECT *, ({RETRYABLE_SQL}) AS retryable "
            f"FROM (SELECT *, {REASON_SQL} AS reason FROM downloads_raw)"
        )
        self._ddl(
            "CREATE OR REPLACE VIEW download_latest AS SELECT * FROM downloads "
            "QUALIFY row_number() OVER (PARTITION BY uid ORDER BY (status = 'success') DESC, round DESC) = 1"
        )

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        """Rows of a query over the views."""
        return self.con.execute(sql, params or {}).fetchall()

    def save(self) -> str:
        """Write the view definitions to `catalog.duckdb` in the workspace, for `duckdb` users; returns its URL.

        On a local workspace the files the views read are named relative to the workspace, so that a moved or copied
        workspace keeps a working catalog: open it from the workspace folder (`cd workspace && duckdb
        catalog.duckdb`), or `SET file_search_path` to that folder.
        """
        with self.ws.scratch() as scratch:
            local = os.path.join(scratch, CATALOG_FILE)
            target = duckdb.connect(local)
            self._search_from_workspace(target)  # the views' files are read when they are created
            for sql in self._statements:
                target.execute(sql)
            target.close()
            self.ws.upload(local, self.ws.path(CATALOG_FILE))
        return self.ws.url(CATALOG_FILE)

    def retryable(self, source: str, columns: list[str]) -> Any:
        """The samples of a source whose last attempt failed for a retryable reason, as an Arrow table."""
        cols = ", ".join(columns)
        sql = f"SELECT {cols} FROM download_latest WHERE source = $s AND retryable ORDER BY uid"
        return self.con.sql(sql, params={"s": source}).to_arrow_table()

    # -- report queries -----------------------------------------------------------------------------------------
    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A query's rows as dicts."""
        cur = self.con.execute(sql, params or {})
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def funnel(self) -> list[dict[str, Any]]:
        """Every source's filter steps, in order."""
        return self.rows("SELECT source, step, rows_in, rows_out, removed FROM funnel")

    def download_reasons(self) -> list[dict[str, Any]]:
        """Samples per source and final outcome, and how many of them went through a retry round already.

        The outcome is success or the reason of the last failure; `retryable`: `--retry-failed` would try again.
        """
        return self.rows(
            "WITH tries AS (SELECT uid, count(*) AS attempts FROM downloads GROUP BY uid) "
            "SELECT source, reason, retryable, count(*) AS samples, count(*) FILTER (WHERE attempts > 1) AS retried "
            "FROM download_latest JOIN tries USING (uid) GROUP BY ALL ORDER BY source, samples DESC, reason"
        )

    def totals(self) -> list[dict[str, Any]]:
        """Per source: metadata rows, curated rows, attempted and downloaded samples."""
        return self.rows(
            """
            WITH m AS (SELECT source, count(*) AS metadata_rows FROM metadata GROUP BY source),
                 c AS (SELECT source, count(*) AS curated_rows FROM curated GROUP BY source),
                 d AS (SELECT source, count(*) AS attempted, count(*) FILTER (WHERE status = 'success') AS downloaded
                       FROM download_latest GROUP BY source)
            SELECT m.source, metadata_rows, coalesce(curated_rows, 0) AS curated_rows,
                   coalesce(attempted, 0) AS attempted, coalesce(downloaded, 0) AS downloaded
            FROM m LEFT JOIN c USING (source) LEFT JOIN d USING (source) ORDER BY m.source
            """
        )

    def shard_counts(self) -> list[dict[str, Any]]:
        """Samples per download shard: attempted, succeeded, failed."""
        return self.rows(
            "SELECT output, shard, count(*) AS attempted, count(*) FILTER (WHERE status = 'success') AS succeeded, "
            "count(*) FILTER (WHERE status <> 'success') AS failed FROM downloads GROUP BY ALL ORDER BY output, shard"
        )

    def feature_counts(self) -> list[dict[str, Any]]:
        """Per feature set and source: features, failed samples, and the clip_score mean."""
        return self.rows(
            """
            WITH f AS (SELECT encoder_id, source, count(*) AS features, round(avg(clip_score), 4) AS mean_clip_score
                       FROM features GROUP BY ALL),
                 x AS (SELECT encoder_id, source, count(*) AS failed FROM feature_failures GROUP BY ALL)
            SELECT encoder_id, source, coalesce(features, 0) AS features, coalesce(failed, 0) AS failed, mean_clip_score
            FROM f FULL JOIN x USING (encoder_id, source) ORDER BY encoder_id, source
            """
        )

    def feature_failure_reasons(self) -> list[dict[str, Any]]:
        """Failed samples per feature set, source and reason (`decode: <message>` counts as decode)."""
        return self.rows(
            "SELECT encoder_id, source, split_part(reason, ':', 1) AS reason, count(*) AS samples "
            "FROM feature_failures GROUP BY ALL ORDER BY encoder_id, source, samples DESC"
        )

    def clip_thresholds(self, thresholds: list[float]) -> list[dict[str, Any]]:
        """How many pairs a post-extraction `clip_score >= t` filter would keep, per feature set and source."""
        cols = ", ".join(f'count(*) FILTER (WHERE clip_score >= {float(t)}) AS "{t:g}"' for t in thresholds)
        return self.rows(
            f"SELECT encoder_id, source, count(*) AS features, {cols} FROM features GROUP BY ALL ORDER BY 1, 2"
        )

    def histogram(self, view: str, expr: str, lo: float, hi: float, bins: int, by_source: bool = True) -> dict:
        """Counts of `expr` over `view` in `bins` equal bins on [lo, hi], per source.

        Values below `lo` and above `hi` are counted apart (`below`, `above`: the overflow bins), never clamped
        into the edge bins; NULL and NaN are unknown and not counted.
        """
        width = (hi - lo) / bins
        sql = (
            f"SELECT src, CASE WHEN v < $lo THEN -1 WHEN v > $hi THEN $bins "
            f"ELSE least(floor((v - $lo) / $w), $bins - 1) END::INTEGER AS b, count(*) AS n "
            f"FROM (SELECT {'source' if by_source else 'NULL'} AS src, ({expr})::DOUBLE AS v FROM {view}) "
            f"WHERE v IS NOT NULL AND NOT isnan(v) GROUP BY ALL"
        )
        counts: dict[str, list[int]] = {}
        below: dict[str, int] = {}
        above: dict[str, int] = {}
        for source, b, n in self.query(sql, {"lo": lo, "hi": hi, "w": width, "bins": bins}):
            key = source or "all"
            row = counts.setdefault(key, [0] * bins)
            below.setdefault(key, 0)
            above.setdefault(key, 0)
            if b < 0:
                below[key] += n
            elif b >= bins:
                above[key] += n
            else:
                row[b] += n
        return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts, "below": below, "above": above}
