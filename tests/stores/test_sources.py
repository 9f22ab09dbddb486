"""Every metadata format on generated files in its real layout, and the errors bad files get."""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stores.metadata import SPACES, clean_caption, clean_caption_sql, make_uid, uid_sql
from stores.sources import SourceFileError, adapter_for, connect, describe, localise, normalised_sql, validate


def rows(path: Path | str, fmt: str, columns: dict | None = None, source: str = "src") -> list[dict]:
    con = connect()
    adapter = adapter_for(fmt, columns)
    mapping, n = validate(con, adapter, str(path))
    sql = normalised_sql(adapter, str(path), mapping, list(describe(con, adapter, str(path))))
    cur = con.execute(sql, {"path": str(path), "source": source})
    names = [d[0] for d in cur.description]
    out = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    assert len(out) == n or fmt in ("mmc4", "coco")  # nested formats count documents, not pairs
    return out


def mmc4_doc(i: int) -> dict:
    return {
        "url": f"http://doc/{i}",
        "text_list": [f"sentence {i}a", f"sentence {i}b"],
        "image_info": [
            {
                "image_name": f"{i}-0.jpg",
                "raw_url": f"http://img/{i}/0.jpg",
                "matched_text_index": 1,
                "matched_sim": 0.3,
                "face_detections": None,
            },
            {
                "image_name": f"{i}-1.jpg",
                "raw_url": f"http://img/{i}/1.jpg",
                "matched_text_index": 0,
                "matched_sim": 0.25,
                "face_detections": None,
            },
        ],
        "similarity_matrix": [[0.1, 0.3], [0.25, 0.2]],
    }


@pytest.mark.parametrize("upper", [True, False])
def test_laion_parquet_in_either_capitalisation(tmp_path: Path, upper: bool) -> None:
    names = ["URL", "TEXT", "WIDTH", "HEIGHT", "LANGUAGE"] if upper else ["url", "caption", "width", "height", "lang"]
    table = pa.table(
        {
            names[0]: [" http://a/1.jpg ", "http://a/2.jpg"],
            names[1]: ["a cat", "a dog"],
            "similarity": [0.31, 0.29],
            names[2]: [640, 320],
            names[3]: [480, 200],
            "punsafe": [0.01, 0.2],
            "pwatermark": [0.3, 0.9],
            names[4]: ["en", "de"],
            "NSFW": ["UNLIKELY", "NSFW"],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    out = rows(tmp_path / "part-0.parquet", "laion", source="laion")
    assert out[0]["url"] == "http://a/1.jpg" and out[0]["caption"] == "a cat"
    assert (out[0]["similarity"], out[0]["width"], out[0]["height"], out[0]["language"]) == (0.31, 640, 480, "en")
    assert (out[1]["punsafe"], out[1]["pwatermark"]) == (0.2, 0.9)
    assert json.loads(out[1]["extra"]) == {"NSFW": "NSFW"}
    assert out[0]["uid"] == make_uid("laion", "http://a/1.jpg") and out[0]["source"] == "laion"


def test_uid_sql_equals_python() -> None:
    got = duckdb.sql(f"SELECT {uid_sql(chr(39) + 'cc3m' + chr(39), chr(39) + 'http://x/y z' + chr(39))}").fetchall()[0][
        0
    ]
    assert got == make_uid("cc3m", "http://x/y z") and len(got) == 16


TRICKY = [
    "a\x00b",
    "\x00\x00only nul\x00",
    "line one\r\nline two\n\n",
    "next\x85line",
    "c1\x80\x9f\x7fend",
    "\ttabs\t and  double  spaces ",
    "\u00a0\u3000wide spaces\u2028\u2029",
    "emoji 👩\u200d👩\u200d👧 and e\u0301",
    "🙂" * 1200,
    "x" * 999 + " y",
    "x" * 999 + "\x00y",
    " " * 5,
    "\x00\r\n",
    "",
    "ünïcödé " * 200,
    ("word\x00\r\n\x85 " * 80_000)[:1_000_000],
]


@pytest.mark.parametrize("max_chars", [1, 5, 1000, 2_000_000])
def test_clean_caption_sql_equals_python(max_chars: int) -> None:
    con = connect()
    con.execute("CREATE TABLE t AS SELECT unnest($texts) AS caption", {"texts": TRICKY})
    got = [r[0] for r in con.execute(f"SELECT {clean_caption_sql('caption', max_chars)} FROM t").fetchall()]
    assert got == [clean_caption(t, max_chars) for t in TRICKY]
    assert con.execute(f"SELECT {clean_caption_sql('NULL::VARCHAR', max_chars)}").fetchone() == (None,)
    with pytest.raises(ValueError, match="positive integer"):
        clean_caption_sql("caption", 0)


def test_caption_spaces_are_what_isspace_holds_besides_control_characters() -> None:
    control = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]}
    assert set(SPACES) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()} - control


def test_captions_are_cleaned_at_ingest(tmp_path: Path) -> None:
    long = "a long caption " * 70_000  # ~1 MB
    captions = ["a\x00cat\r\non a mat", long, "\x85\x00", None]
    table = pa.table({"url": [f"http://a/{i}.jpg" for i in range(4)], "caption": captions})
    pq.write_table(table, tmp_path / "part-0.parquet")
    out = rows(tmp_path / "part-0.parquet", "laion")
    assert [r["caption"] for r in out] == ["a cat on a mat", long[:1000].strip(), "", None]
    con = connect()
    sql = normalised_sql(
        adapter_for("laion"),
        str(tmp_path / "part-0.parquet"),
        {"url": "url", "caption": "caption"},
        ["url", "caption"],
        caption_max_chars=12,
    )
    capped = con.execute(sql, {"path": str(tmp_path / "part-0.parquet"), "source": "s"}).fetchall()
    assert [r[3] for r in capped] == ["a cat on a m", "a long capti", "", None]


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zip"])
def test_mmc4_documents_give_one_pair_per_image(tmp_path: Path, suffix: str) -> None:
    text = "".join(json.dumps(mmc4_doc(i)) + "\n" for i in range(3))
    path = tmp_path / f"docs_shard_0_v2.{suffix}"
    if suffix == "jsonl":
        path.write_text(text)
    elif suffix == "jsonl.gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("docs_shard_0_v2.jsonl", text)
    local = localise(str(path), str(tmp_path))
    out = sorted(rows(local, "mmc4", source="mmc4"), key=lambda r: r["url"])
    assert len(out) == 6
    assert out[0] == {**out[0], "url": "http://img/0/0.jpg", "caption": "sentence 0b", "similarity": 0.3}
    assert out[1]["caption"] == "sentence 0a" and out[1]["similarity"] == 0.25
    assert json.loads(out[0]["extra"]) == {"document": "http://doc/0", "image_name": "0-0.jpg"}


@pytest.mark.parametrize(
    ("fmt", "line"), [("cc3m", 'a "quoted" caption\t{url}'), ("cc12m", '{url}\ta "quoted" caption')]
)
def test_cc3m_and_cc12m_headerless_tsv(tmp_path: Path, fmt: str, line: str) -> None:
    path = tmp_path / f"{fmt}.tsv"
    path.write_text("\n".join(line.format(url=f"http://c/{i}.jpg") for i in range(4)) + "\n")
    out = rows(path, fmt)
    assert [r["url"] for r in out] == [f"http://c/{i}.jpg" for i in range(4)]
    assert {r["caption"] for r in out} == {'a "quoted" caption'} and out[0]["similarity"] is None


def test_sbu_json(tmp_path: Path) -> None:
    path = tmp_path / "sbu-captions-all.json"
    path.write_text(
        json.dumps({"image_urls": ["http://s/1", "http://s/2"], "captions": ["one", "two"], "user_ids": ["u1", "u2"]})
    )
    assert [(r["url"], r["caption"]) for r in rows(path, "sbu")] == [("http://s/1", "one"), ("http://s/2", "two")]


def test_coco_captions_join_images(tmp_path: Path) -> None:
    path = tmp_path / "captions_train2017.json"
    doc = {
        "info": {},
        "licenses": [],
        "images": [{"id": 7, "file_name": "7.jpg", "coco_url": "http://coco/7.jpg", "width": 640, "height": 427}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "A cat."}, {"image_id": 7, "id": 2, "caption": "Cat."}],
    }
    path.write_text(json.dumps(doc))
    out = sorted(rows(path, "coco"), key=lambda r: r["caption"])
    assert [(r["url"], r["caption"], r["width"], r["height"]) for r in out] == [
        ("http://coco/7.jpg", "A cat.", 640, 427),
        ("http://coco/7.jpg", "Cat.", 640, 427),
    ]


def test_coyo_uses_its_clip_and_safety_columns(tmp_path: Path) -> None:
    pq.write_table(
        pa.table(
            {
                "id": [1],
                "url": ["http://y/1"],
                "text": ["coyo text"],
                "width": [500],
                "height": [400],
                "clip_similarity_vitb32": [0.2],
                "clip_similarity_vitl14": [0.27],
                "nsfw_score_opennsfw2": [0.02],
                "watermark_score": [0.4],
                "aesthetic_score_laion_v2": [5.1],
            }
        ),
        tmp_path / "coyo.parquet",
    )
    (r,) = rows(tmp_path / "coyo.parquet", "coyo")
    assert (r["similarity"], r["punsafe"], r["pwatermark"], r["width"]) == (0.27, 0.02, 0.4, 500)


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "jsonl"])
def test_generic_with_a_column_mapping(tmp_path: Path, ext: str) -> None:
    data = {"link": ["http://g/1", "http://g/2"], "desc": ["hello world", "bye"], "score": [0.4, 0.1]}
    path = tmp_path / f"meta.{ext}"
    if ext == "parquet":
        pq.write_table(pa.table(data), path)
    elif ext == "jsonl":
        path.write_text(
            "".join(json.dumps(dict(zip(data, v, strict=True))) + "\n" for v in zip(*data.values(), strict=True))
        )
    else:
        sep = "," if ext == "csv" else "\t"
        lines = [sep.join(data)] + [sep.join(map(str, v)) for v in zip(*data.values(), strict=True)]
        path.write_text("\n".join(lines) + "\n")
    out = rows(path, "generic", {"url": "link", "caption": "desc", "similarity": "score"})
    assert [(r["url"], r["caption"], r["similarity"]) for r in out] == [
        ("http://g/1", "hello world", 0.4),
        ("http://g/2", "bye", 0.1),
    ]


def test_missing_or_misspelt_column_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"URL": ["http://a"], "TXET": ["typo"]}), tmp_path / "bad.parquet")
    with pytest.raises(SourceFileError, match=r"bad\.parquet: no column for 'caption' .*the file has: URL, TXET"):
        rows(tmp_path / "bad.parquet", "laion")


def test_wrong_type_names_file_column_and_value(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("url,caption,score\nhttp://a,ok,0.3\nhttp://b,ok,high\n")
    with pytest.raises(SourceFileError, match=r"m\.csv: column 'score' \(similarity\) has a non-numeric value 'high'"):
        rows(tmp_path / "m.csv", "generic", {"similarity": "score"})
    pq.write_table(pa.table({"URL": [1, 2], "TEXT": ["a", "b"]}), tmp_path / "n.parquet")
    with pytest.raises(SourceFileError, match="holds numbers"):
        rows(tmp_path / "n.parquet", "laion")


def test_empty_unreadable_and_unknown_files(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}), tmp_path / "e.parquet"
    )
    with pytest.raises(SourceFileError, match=r"e\.parquet: the file has no rows"):
        rows(tmp_path / "e.parquet", "laion")
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(b'{"url": "x"}\n')[:-12])
    with pytest.raises(SourceFileError, match=r"docs\.jsonl\.gz: cannot be read as mmc4"):
        rows(tmp_path / "docs.jsonl.gz", "mmc4")
    (tmp_path / "docs.jsonl.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(SourceFileError, match="unreadable zip archive"):
        localise(str(tmp_path / "docs.jsonl.zip"), str(tmp_path))
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(SourceFileError, match="unknown file type"):
        rows(tmp_path / "m.xlsx", "generic")
    with pytest.raises(SourceFileError, match="unknown target column"):
        adapter_for("generic", {"urls": "link"})
