"""Curation SQL: the per-source filter funnel over normalised metadata, in DuckDB with bounded memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Words = runs of non-whitespace. Counting single spaces is exact and cheap when no run of whitespace or control
# whitespace is present; only the other captions take the regex path.
_IRREGULAR = " OR ".join(["contains(caption, '  ')"] + [f"contains(caption, chr({c}))" for c in (9, 10, 11, 12, 13)])
WORDS = (
    f"(CASE WHEN {_IRREGULAR} THEN len(regexp_split_to_array(trim(caption, ' ' || chr(9) || chr(10) || chr(11) || "
    r"chr(12) || chr(13)), '\s+')) ELSE length(trim(caption)) - length(replace(trim(caption), ' ', '')) + 1 END)"
)
ASPECT = "greatest(width, height)::DOUBLE / least(width, height)"

# Row filters, in funnel order: (step, config key or None when always on, predicate). NULL values pass a filter
# they cannot be judged by, except similarity thresholds (an unscored row cannot be ranked).
ROW_STEPS: tuple[tuple[str, str | None, str], ...] = (
    ("caption_present", None, "caption IS NOT NULL AND trim(caption) <> ''"),
    ("http_url", None, r"regexp_matches(url, '^https?://[^\s/]+', 'i')"),  # schemes are case-insensitive
    ("min_width", "min_width", "width IS NULL OR width >= $min_width"),
    ("min_height", "min_height", "height IS NULL OR height >= $min_height"),
    (
        "max_aspect_ratio",
        "max_aspect_ratio",
        f"width IS NULL OR height IS NULL OR least(width, height) <= 0 OR {ASPECT} <= $max_aspect_ratio",
    ),
    ("min_caption_words", "min_caption_words", f"{WORDS} >= $min_caption_words"),
    ("max_caption_words", "max_caption_words", f"{WORDS} <= $max_caption_words"),
    ("min_caption_chars", "min_caption_chars", "length(caption) >= $min_caption_chars"),
    ("max_caption_chars", "max_caption_chars", "length(caption) <= $max_caption_chars"),
    ("languages", "languages", "language IS NULL OR list_contains($languages, lower(language))"),
    ("max_punsafe", "max_punsafe", "punsafe IS NULL OR punsafe <= $max_punsafe"),
    ("max_pwatermark", "max_pwatermark", "pwatermark IS NULL OR pwatermark <= $max_pwatermark"),
    ("min_similarity", "min_similarity", "similarity IS NOT NULL AND similarity >= $min_similarity"),
)
# Within a source the same URL has the same uid, so only the uids seen twice need ranking.
DEDUP_WITHIN = """
CREATE OR REPLACE TABLE step_out AS
WITH dups AS (SELECT uid FROM step_in GROUP BY uid HAVING count(*) > 1)
SELECT * FROM step_in ANTI JOIN dups USING (uid)
UNION ALL
(SELECT * FROM step_in SEMI JOIN dups USING (uid)
 QUALIFY row_number() OVER (PARTITION BY uid ORDER BY similarity DESC NULLS LAST, caption) = 1)
"""
# Top-K without sorting every row: find the K-th score, keep what is above it and the first ties by uid.
KTH_SCORE = "SELECT similarity FROM step_in WHERE similarity IS NOT NULL ORDER BY similarity DESC LIMIT 1 OFFSET $k"
TOP_K = """
CREATE OR REPLACE TABLE step_out AS
SELECT * FROM step_in WHERE similarity > $kth
UNION ALL
(SELECT * FROM step_in WHERE similarity = $kth ORDER BY uid LIMIT $ties)
"""
ALL_SCORED = "CREATE OR REPLACE TABLE step_out AS SELECT * FROM step_in WHERE similarity IS NOT NULL"
DEDUP_ACROSS = """
CREATE OR REPLACE TABLE step_out AS SELECT * FROM step_in ANTI JOIN (SELECT url FROM read_parquet($earlier)) USING (url)
"""
SAMPLE = """
CREATE OR REPLACE TABLE step_out AS SELECT * FROM step_in
QUALIFY row_number() OVER (ORDER BY md5(uid || ':' || $seed), uid) <= $sample
"""
OUTPUT_COLUMNS = "uid, source, url, caption, similarity, width, height"


@dataclass(frozen=True)
class FunnelStep:
    """Rows into and out of one filter of one source."""

    step: str
    rows_in: int
    rows_out: int

    @property
    def removed(self) -> int:
        """Rows the filter removed."""
        return self.rows_in - self.rows_out


def active_row_steps(filters: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The row filters that apply, with their bound values: (step, predicate, params)."""
    out = []
    for step, key, predicate in ROW_STEPS:
        if key is None:
            out.append((step, predicate, {}))
            continue
        value = filters.get(key)
        if value is None or (value == 0 and key.startswith("min_") and key != "min_similarity"):
            continue
        if key == "languages":
            value = [str(v).lower() for v in value]
        out.append((step, predicate, {key: value}))
    return out


def run_funnel(
    con: Any, inputs: Sequence[str], filters: Mapping[str, Any], earlier: Sequence[str], seed: int
) -> list[FunnelStep]:
    """Filter `inputs` (normalised Parquet) into table `step_out`, counting rows in and out of every step.

    Args:
        con: a DuckDB connection (bounded memory, spilling to disk).
        inputs: normalised metadata files of the source.
        filters: the source's filter settings (FilterConfig fields).
        earlier: curated files of the sources before this one (their URLs win the cross-source dedup).
        seed: the sampling seed.
    """
    steps = active_row_steps(filters)
    params: dict[str, Any] = {"files": list(inputs)}
    for _, _, p in steps:
        params.update(p)
    # One pass counts where each row first fails (each predicate evaluated at most once per row) ...
    first_fail = " ".join(f"WHEN NOT coalesce(({pred}), false) THEN {i + 1}" for i, (_, pred, _) in enumerate(steps))
    fails = dict(
        con.execute(
            f"SELECT CASE {first_fail} ELSE 0 END AS fail, count(*) FROM read_parquet($files) GROUP BY fail", params
        ).fetchall()
    )
    funnel, rows = [], sum(fails.values())
    for i, (step, _, _) in enumerate(steps):
        funnel.append(FunnelStep(step, rows, rows - fails.get(i + 1, 0)))
        rows = funnel[-1].rows_out
    # ... and a second keeps the survivors.
    every = " AND ".join(f"({pred})" for _, pred, _ in steps)
    con.execute(f"CREATE OR REPLACE TABLE step_in AS SELECT * FROM read_parquet($files) WHERE {every}", params)
    funnel.append(_set_step(con, "dedup_within", DEDUP_WITHIN, {}))
    if filters.get("top_k"):
        funnel.append(_top_k(con, int(filters["top_k"])))
    if earlier:
        funnel.append(_set_step(con, "dedup_across", DEDUP_ACROSS, {"earlier": list(earlier)}))
    if filters.get("sample"):
        funnel.append(_set_step(con, "sample", SAMPLE, {"sample": filters["sample"], "seed": str(seed)}))
    con.execute("ALTER TABLE step_in RENAME TO step_out")
    return funnel


def _top_k(con: Any, k: int) -> FunnelStep:
    kth = con.execute(KTH_SCORE, {"k": k - 1}).fetchall()
    if not kth:  # fewer than K scored rows: keep them all
        return _set_step(con, "top_k", ALL_SCORED, {})
    above = con.execute("SELECT count(*) FROM step_in WHERE similarity > $kth", {"kth": kth[0][0]}).fetchall()[0][0]
    return _set_step(con, "top_k", TOP_K, {"kth": kth[0][0], "ties": k - above})


def _set_step(con: Any, step: str, sql: str, params: Mapping[str, Any]) -> FunnelStep:
    rows_in = con.execute("SELECT count(*) FROM step_in").fetchone()[0]
    con.execute(sql, dict(params))
    rows_out = con.execute("SELECT count(*) FROM step_out").fetchone()[0]
    con.execute("DROP TABLE step_in")
    con.execute("ALTER TABLE step_out RENAME TO step_in")
    return FunnelStep(step, rows_in, rows_out)


def write_output(con: Any, out_dir: str, rows_per_file: int) -> None:
    """Write table `step_out` as url lists for img2dataset, in uid order (a deterministic shuffle of hosts)."""
    target = out_dir.replace("'", "''")
    con.execute(
        f"COPY (SELECT {OUTPUT_COLUMNS} FROM step_out ORDER BY uid) TO '{target}' "
        f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {int(rows_per_file)}, ROW_GROUPS_PER_FILE 1)"
    )
