"""Curation: every filter, the funnel arithmetic, dedup within and across sources, top-K, sampling, reruns."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import Config, SourceConfig
from pipelines.curate import stage as curate
from pipelines.ingest import stage as ingest
from stores.ledger import LedgerConflict

BASE = {
    "url": "http://h/{i}.jpg",
    "caption": "a red circle on blue",
    "similarity": 0.3,
    "width": 400,
    "height": 300,
    "punsafe": 0.01,
    "pwatermark": 0.1,
    "language": "en",
}


def write_laion(path: Path, rows: list[dict]) -> None:
    full = [{**BASE, **r, "url": r.get("url", BASE["url"].format(i=i))} for i, r in enumerate(rows)]
    cols = {k.upper() if k in ("url", "width", "height", "language") else k: [r[k] for r in full] for k in BASE}
    cols["TEXT"] = cols.pop("caption")
    pq.write_table(pa.table(cols), path)


def make_cfg(tmp_path: Path, sources: dict[str, list[dict]], filters: dict[str, dict] | None = None) -> Config:
    srcs = []
    for name, rows in sources.items():
        (tmp_path / name).mkdir(exist_ok=True)
        write_laion(tmp_path / name / "part-0.parquet", rows)
        f = (filters or {}).get(name, {})
        srcs.append(SourceConfig(name=name, format="laion", paths=[str(tmp_path / name / "*.parquet")], filters=f))
    return Config(workspace=str(tmp_path / "ws"), sources=srcs)


def kept_urls(result: curate.CurateResult, source: str) -> set[str]:
    files = next(s for s in result.sources if s.source == source).files
    return {r[0] for r in duckdb.sql(f"SELECT url FROM read_parquet({files!r})").fetchall()} if files else set()


def steps(result: curate.CurateResult, source: str) -> dict[str, tuple[int, int]]:
    return {r.step: (r.rows_in, r.rows_out) for s in result.sources if s.source == source for r in s.funnel}


# (filter settings, the row that must be removed, the step that removes it)
CASES = [
    ({}, {"caption": "   "}, "caption_present"),
    ({}, {"url": "ftp://h/x.jpg"}, "http_url"),
    ({}, {"url": "javascript:alert(1)"}, "http_url"),
    ({"min_width": 200}, {"width": 199}, "min_width"),
    ({"min_height": 200}, {"height": 150}, "min_height"),
    ({"max_aspect_ratio": 2.0}, {"width": 900, "height": 300}, "max_aspect_ratio"),
    ({"min_caption_words": 3}, {"caption": "two  words"}, "min_caption_words"),
    ({"max_caption_words": 5}, {"caption": "one two three four five six"}, "max_caption_words"),
    ({"min_caption_chars": 10}, {"caption": "short"}, "min_caption_chars"),
    ({"max_caption_chars": 30}, {"caption": "x" * 31}, "max_caption_chars"),
    ({"languages": ["EN", "de"]}, {"language": "fr"}, "languages"),
    ({"max_punsafe": 0.5}, {"punsafe": 0.51}, "max_punsafe"),
    ({"max_pwatermark": 0.5}, {"pwatermark": 0.8}, "max_pwatermark"),
    ({"min_similarity": 0.28}, {"similarity": 0.27}, "min_similarity"),
]


@pytest.mark.parametrize(("filters", "bad", "step"), CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_each_filter_removes_exactly_its_row(tmp_path: Path, filters: dict, bad: dict, step: str) -> None:
    rows = [{}, {}, bad, {"language": None, "width": None, "height": None, "punsafe": None}]  # unknowns pass
    cfg = make_cfg(tmp_path, {"a": rows}, {"a": filters})
    ingest.run(cfg)
    result = curate.run(cfg)
    funnel = steps(result, "a")
    assert funnel[step] == (funnel[step][0], funnel[step][0] - 1)
    assert sum(i - o for i, o in funnel.values()) == 1
    bad_url = bad.get("url", "http://h/2.jpg")
    assert bad_url not in kept_urls(result, "a") and len(kept_urls(result, "a")) == 3


def test_funnel_arithmetic_and_dedup(tmp_path: Path) -> None:
    a = [{"similarity": 0.2 + i / 100, "width": 100 + 50 * (i % 5)} for i in range(20)]
    a += [{"url": "http://h/3.jpg", "similarity": 0.5, "caption": "the better caption"}]  # duplicate url within a
    b = [{"url": f"http://h/{i}.jpg"} for i in range(15, 25)]  # 15..19 already kept by a, earlier in the config
    cfg = make_cfg(tmp_path, {"a": a, "b": b}, {"a": {"min_width": 200, "min_similarity": 0.22}})
    ingest.run(cfg)
    result = curate.run(cfg)
    for src in result.sources:
        for prev, cur in zip(src.funnel, src.funnel[1:], strict=False):
            assert prev.rows_out == cur.rows_in
        assert all(r.rows_in - r.rows_out == r.removed >= 0 for r in src.funnel)
        assert src.funnel[0].rows_in == src.rows_in and src.funnel[-1].rows_out == src.rows_out == len(
            kept_urls(result, src.source)
        )
    fa, fb = steps(result, "a"), steps(result, "b")
    assert fa["dedup_within"][0] - fa["dedup_within"][1] == 1
    kept_a = duckdb.sql(f"SELECT url, caption FROM read_parquet({result.sources[0].files!r})").fetchall()
    assert ("http://h/3.jpg", "the better caption") in kept_a  # the higher-similarity duplicate wins
    removed_across = fb["dedup_across"][0] - fb["dedup_across"][1]
    assert removed_across == len({f"http://h/{i}.jpg" for i in range(15, 20)} & kept_urls(result, "a")) > 0
    assert not kept_urls(result, "a") & kept_urls(result, "b")


def test_top_k_breaks_ties_deterministically_and_drops_unscored(tmp_path: Path) -> None:
    rows = [{"similarity": s} for s in (0.9, 0.5, 0.5, 0.5, 0.1)] + [{"similarity": None}]
    cfg = make_cfg(tmp_path, {"a": rows}, {"a": {"top_k": 3}})
    ingest.run(cfg)
    first = kept_urls(curate.run(cfg), "a")
    assert len(first) == 3 and "http://h/0.jpg" in first and "http://h/4.jpg" not in first
    cfg2 = cfg.model_copy(update={"workspace": str(tmp_path / "ws2")})
    ingest.run(cfg2)
    assert kept_urls(curate.run(cfg2), "a") == first


def test_sample_is_deterministic(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"a": [{} for _ in range(50)]}, {"a": {"sample": 10}})
    ingest.run(cfg)
    got = kept_urls(curate.run(cfg), "a")
    cfg2 = cfg.model_copy(update={"workspace": str(tmp_path / "ws2")})
    ingest.run(cfg2)
    assert len(got) == 10 and kept_urls(curate.run(cfg2), "a") == got
    cfg3 = cfg.model_copy(update={"workspace": str(tmp_path / "ws3"), "seed": 1})
    ingest.run(cfg3)
    assert kept_urls(curate.run(cfg3), "a") != got


def test_reruns_skip_changes_are_refused_new_input_is_redone(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"a": [{} for _ in range(5)]}, {"a": {"min_width": 10}})
    ingest.run(cfg)
    assert not curate.run(cfg).sources[0].skipped
    assert curate.run(cfg).sources[0].skipped
    changed = cfg.model_copy(deep=True)
    changed.sources[0].filters.min_width = 500
    with pytest.raises(LedgerConflict, match=r"filters\.min_width: 10 -> 500"):
        curate.run(changed)
    assert curate.run(changed, force=True).sources[0].rows_out == 0  # every row is 400 wide
    write_laion(tmp_path / "a" / "part-1.parquet", [{"url": "http://new/1.jpg", "width": 600}])
    ingest.run(changed)
    redone = curate.run(changed)
    assert not redone.sources[0].skipped and "http://new/1.jpg" in kept_urls(redone, "a")
    assert len(redone.sources[0].files) == 1  # the old generation's files are gone


def test_ingest_checks_every_file_before_writing(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"a": [{}]})
    pq.write_table(pa.table({"URL": ["http://x"], "TXET": ["typo"]}), tmp_path / "a" / "part-9.parquet")
    from stores.sources import SourceFileError

    with pytest.raises(SourceFileError, match=r"part-9\.parquet: no column for 'caption'"):
        ingest.run(cfg)
    assert not (tmp_path / "ws" / "sources").exists()  # the good file was not written either


def test_nan_and_infinite_numbers_are_unknown_to_every_filter_and_ranking(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    rows = [  # (url, caption, similarity, width, punsafe)
        ("http://h/0.jpg", "the scored caption", 0.3, 640.0, 0.1),
        ("http://h/0.jpg", "the unscored caption", nan, 640.0, 0.1),  # the same URL: must lose the dedup
        ("http://h/1.jpg", "an infinite score", inf, 640.0, 0.1),
        ("http://h/2.jpg", "a negative infinite score", -inf, 640.0, 0.1),
        ("http://h/3.jpg", "unknown size and safety", 0.25, nan, nan),
        ("http://h/4.jpg", "an infinite size", 0.1, inf, -inf),
    ]
    (tmp_path / "a").mkdir()
    names = ("URL", "TEXT", "similarity", "WIDTH", "punsafe")
    columns = {name: [r[i] for r in rows] for i, name in enumerate(names)}
    pq.write_table(pa.table(columns), tmp_path / "a" / "p.parquet")
    (tmp_path / "b").mkdir()  # the same as text: "nan", "inf" and "-inf" in a csv
    lines = ["url,caption,similarity,width"] + [f"{u.replace('h/', 'c/')},{c},{s},{w}" for u, c, s, w, _ in rows]
    (tmp_path / "b" / "p.csv").write_text("\n".join(lines) + "\n")
    top = {"top_k": 2, "min_width": 100, "max_punsafe": 0.5}
    srcs = [
        SourceConfig(name="a", format="laion", paths=[str(tmp_path / "a" / "*")], filters=top),
        SourceConfig(name="b", format="generic", paths=[str(tmp_path / "b" / "*")], filters={"min_similarity": 0.2}),
    ]
    cfg = Config(workspace=str(tmp_path / "ws"), sources=srcs)
    ingest.run(cfg)
    result = curate.run(cfg)
    meta = f"read_parquet('{tmp_path}/ws/sources/*/*.parquet')"
    counts = duckdb.sql(
        "SELECT count(*) FILTER (WHERE NOT (isfinite(similarity) AND isfinite(width) AND isfinite(punsafe))), "
        f"count(*) FILTER (WHERE similarity IS NULL), count(*) FILTER (WHERE width IS NULL) FROM {meta}"
    ).fetchall()
    assert counts == [(0, 6, 4)]  # no NaN or infinity is left (a NULL is not counted by the first)
    # top 2 by score: the real scores 0.3 and 0.25, never a NaN or an infinity; an unknown size passes min_width
    kept_a = duckdb.sql(f"SELECT url, caption FROM read_parquet({result.sources[0].files!r})").fetchall()
    assert sorted(kept_a) == [("http://h/0.jpg", "the scored caption"), ("http://h/3.jpg", "unknown size and safety")]
    kept_b = duckdb.sql(f"SELECT url, caption FROM read_parquet({result.sources[1].files!r})").fetchall()
    assert sorted(kept_b) == [("http://c/0.jpg", "the scored caption"), ("http://c/3.jpg", "unknown size and safety")]


def test_url_schemes_are_case_insensitive_and_only_http_passes(tmp_path: Path) -> None:
    good = ["HTTP://h/1.jpg", "Https://h/2.jpg", "hTtP://h/3.jpg", "https://h/4.jpg"]
    bad = ["ftp://h/5.jpg", "FILE:///etc/passwd", "data:image/png;base64,AA==", "h/6.jpg", "HTTP:/h/7.jpg"]
    cfg = make_cfg(tmp_path, {"a": [{"url": u} for u in good + bad]})
    ingest.run(cfg)
    result = curate.run(cfg)
    assert kept_urls(result, "a") == set(good) and steps(result, "a")["http_url"] == (9, 4)


def test_ingest_cleans_captions_to_the_configured_cap(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"a": [{"caption": "a\x00red\r\ncircle\x85 "}, {"caption": "word " * 200_000}]})
    cfg.curate.caption_max_chars = 20
    ingest.run(cfg)
    captions = duckdb.sql(f"SELECT caption FROM read_parquet('{tmp_path}/ws/sources/a/*.parquet') ORDER BY url")
    assert captions.fetchall() == [("a red circle",), ("word word word word",)]
    wider = cfg.model_copy(deep=True)
    wider.curate.caption_max_chars = 30  # the cap shapes ingest's output: a change asks for --force
    with pytest.raises(LedgerConflict, match=r"caption_max_chars: 20 -> 30"):
        ingest.run(wider)
