"""Benchmark: ibllm's DuckDB curation vs the same filters in plain pandas, rows/s and peak RSS at 5M and 20M rows.

Usage: python bench/curate.py [--rows 5000000 20000000] [--dir /tmp/ibllm-bench-curate] [--skip-pandas-above N]
Each measurement runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

FILTERS = {
    "min_similarity": 0.28,
    "min_width": 128,
    "min_height": 128,
    "max_aspect_ratio": 3.0,
    "min_caption_words": 2,
    "languages": ["en"],
    "max_punsafe": 0.5,
    "max_pwatermark": 0.8,
}
TOP_SHARE = 0.25  # top-K keeps a quarter of the input, like "the top 100M of LAION" keeps a share of it

GENERATE = """
COPY (
  SELECT
    'http://host' || (j % 5000) || '.example.com/img/' || j || '.jpg' AS URL,
    array_to_string(list_transform(range(1 + i % 14), lambda x: 'word' || ((i * 31 + x * 7) % 997)), ' ') AS TEXT,
    0.30 + 0.04 * sqrt(-2 * ln(random() + 1e-12)) * cos(2 * pi() * random()) AS similarity,
    (64 + (i * 37) % 1200)::BIGINT AS WIDTH,
    (64 + (i * 53) % 900)::BIGINT AS HEIGHT,
    pow(random(), 6) AS punsafe,
    pow(random(), 2) AS pwatermark,
    CASE WHEN i % 10 < 8 THEN 'en' WHEN i % 10 = 8 THEN 'de' ELSE 'fr' END AS LANGUAGE
  FROM (SELECT i, CASE WHEN i % 20 = 0 THEN i - 7 ELSE i END AS j FROM range($rows) t(i))  -- 5% repeat a URL
) TO '{out}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1000000, ROW_GROUPS_PER_FILE 1)
"""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(rows: int, root: str) -> str:
    """LAION-layout Parquet files of `rows` rows (5% duplicate URLs, realistic score spread) + ingest them."""
    import duckdb

    meta = os.path.join(root, "laion")
    if not os.path.isdir(meta):
        con = duckdb.connect()
        con.execute("SELECT setseed(0.42)")
        con.execute(GENERATE.format(out=meta), {"rows": rows})
    return meta


def config(root: str, meta: str, rows: int) -> object:
    from pipelines.config import Config, CurateConfig, SourceConfig

    src = SourceConfig(
        name="laion",
        format="laion",
        paths=[os.path.join(meta, "*.parquet")],
        filters={**FILTERS, "top_k": int(rows * TOP_SHARE)},
    )
    return Config(workspace=os.path.join(root, "ws"), sources=[src], curate=CurateConfig(memory_limit="1GB", threads=2))


def child_ibllm(root: str, meta: str, rows: int) -> dict:
    from pipelines.curate import stage as curate

    start = time.perf_counter()
    result = curate.run(config(root, meta, rows), force=True)
    took = time.perf_counter() - start
    return {"seconds": took, "kept": result.sources[0].rows_out, "peak_rss_mb": peak_rss_mb()}


def child_pandas(root: str, meta: str, rows: int) -> dict:
    import glob

    import pandas as pd

    start = time.perf_counter()
    files = sorted(glob.glob(os.path.join(root, "ws", "sources", "laion", "*.parquet")))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    caption = df["caption"].fillna("").str.strip()
    words = caption.str.split().str.len()
    w, h = df["width"], df["height"]
    aspect = pd.concat([w, h], axis=1).max(axis=1) / pd.concat([w, h], axis=1).min(axis=1)
    keep = (
        (caption != "")
        & df["url"].str.match(r"^https?://[^\s/]+")
        & (w.isna() | (w >= FILTERS["min_width"]))
        & (h.isna() | (h >= FILTERS["min_height"]))
        & (w.isna() | h.isna() | (aspect <= FILTERS["max_aspect_ratio"]))
        & (words >= FILTERS["min_caption_words"])
        & (df["language"].isna() | df["language"].str.lower().isin(FILTERS["languages"]))
        & (df["punsafe"].isna() | (df["punsafe"] <= FILTERS["max_punsafe"]))
        & (df["pwatermark"].isna() | (df["pwatermark"] <= FILTERS["max_pwatermark"]))
        & (df["similarity"] >= FILTERS["min_similarity"])
    )
    kept = df[keep].sort_values(["similarity", "caption", "uid"], ascending=[False, True, True])
    kept = kept.drop_duplicates("url", keep="first")
    kept = kept.sort_values(["similarity", "uid"], ascending=[False, True]).head(int(rows * TOP_SHARE))
    kept[["uid", "source", "url", "caption", "similarity", "width", "height"]].sort_values("uid").to_parquet(
        os.path.join(root, "pandas-out.parquet")
    )
    return {"seconds": time.perf_counter() - start, "kept": len(kept), "peak_rss_mb": peak_rss_mb()}


def measure(engine: str, root: str, meta: str, rows: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", engine, "--dir", root, "--meta", meta, "--rows", str(rows)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[5_000_000, 20_000_000])
    p.add_argument("--dir", default="/tmp/ibllm-bench-curate")
    p.add_argument(
        "--skip-pandas-above",
        type=int,
        default=10_000_000,
        help="pandas holds everything in memory (~1 KB a row): 20M rows would need ~21 GB",
    )
    p.add_argument("--child", choices=["ibllm", "pandas"])
    p.add_argument("--meta")
    args = p.parse_args()
    if args.child:
        fn = child_ibllm if args.child == "ibllm" else child_pandas
        print(json.dumps(fn(args.dir, args.meta, args.rows[0])))
        return
    print(f"{'rows':>12} {'engine':<7} {'seconds':>8} {'rows/s':>12} {'peak RSS MB':>12} {'kept':>10}")
    for rows in args.rows:
        root = os.path.join(args.dir, f"{rows}")
        os.makedirs(root, exist_ok=True)
        meta = generate(rows, root)
        from pipelines.ingest import stage as ingest

        start = time.perf_counter()
        ingest.run(config(root, meta, rows))
        print(f"{rows:>12,} ingest  {time.perf_counter() - start:>8.1f}   (normalising the metadata, not compared)")
        results = {"ibllm": measure("ibllm", root, meta, rows)}
        if rows <= args.skip_pandas_above:
            results["pandas"] = measure("pandas", root, meta, rows)
        else:
            print(
                f"{rows:>12,} pandas  skipped: it holds every row in memory (~1 KB a row here); see --skip-pandas-above"
            )
        for engine, r in results.items():
            print(
                f"{rows:>12,} {engine:<7} {r['seconds']:>8.1f} {rows / r['seconds']:>12,.0f} "
                f"{r['peak_rss_mb']:>12,.0f} {r['kept']:>10,}"
            )
        if "pandas" in results:
            speed = results["pandas"]["seconds"] / results["ibllm"]["seconds"]
            print(
                f"{rows:>12,} ratio   ibllm is {speed:.1f}x the pandas rows/s; same kept rows: "
                f"{results['pandas']['kept'] == results['ibllm']['kept']}"
            )


if __name__ == "__main__":
    main()
