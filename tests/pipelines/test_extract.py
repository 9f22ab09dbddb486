"""Extraction with Ray on the tiny encoder: exactly once, failures recorded, kills survived, features exact."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model.imagebind.decode import load_image, resize_crop
from model.imagebind.encoder import ImageBind
from model.imagebind.tokenizer import learn_merges, write_vocab
from pipelines.config import Config, load_config
from pipelines.extract import read as extract_read
from pipelines.extract import stage as extract
from stores import features
from stores.ledger import Ledger, LedgerConflict
from stores.metadata import make_uid
from stores.workspace import Workspace
from tests.hostile_media import add_member, png_claiming

CAPTIONS = ["a red circle on a blue background", "a small green square on white", "a large star on black"]


def sample_files(i: int, shard: int) -> tuple[str, dict[str, bytes], str | None]:
    key = f"{shard:05d}{i:04d}"
    url = f"http://h/{shard}/{i}.jpg"
    caption = CAPTIONS[i % 3]
    rng = np.random.default_rng(shard * 100 + i)
    buf = io.BytesIO()
    Image.fromarray((rng.random((60 + i, 80, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    image, failure = buf.getvalue(), None
    if i == 3:
        image, failure = b"not a jpeg at all", "decode"
    if i == 5:
        caption, failure = "   ", "empty_caption"
    meta = {"uid": make_uid("s", url), "url": url, "caption": caption, "source": "s", "key": key}
    return key, {"jpg": image, "txt": caption.encode(), "json": json.dumps(meta).encode()}, failure


def write_tar(path: Path, shard: int, n: int) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            key, files, _ = sample_files(i, shard)
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_workspace(tmp_path: Path, shards: int = 4, per_shard: int = 8, broken: bool = True) -> Config:
    """Download shards as img2dataset would leave them, committed in the download ledger."""
    ws_root = tmp_path / "ws"
    folder = ws_root / "shards" / "s"
    folder.mkdir(parents=True)
    vocab = tmp_path / "vocab.txt.gz"
    write_vocab(vocab, learn_merges(CAPTIONS * 4, 80))
    cfg = Config(
        workspace=str(ws_root),
        sources=[{"name": "s", "format": "synthetic"}],
        model={"imagebind": "tiny", "imagebind_vocab": str(vocab)},
        extract={"batch_size": 8, "actors": 1, "dtype": "float32", "device": "cpu"},
        ray={"num_cpus": 2},
    )
    ws = Workspace(cfg.workspace)
    ledger = Ledger(ws, "download", "s", {"test": 1})
    for shard in range(shards):
        tar = folder / f"{shard:05d}.tar"
        write_tar(tar, shard, per_shard)
        if broken and shard == 1:
            tar.write_bytes(b"\x00garbage" * 100)  # not a tar at all
        if broken and shard == 2:
            tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # truncated mid-member
        (folder / f"{shard:05d}.parquet").write_bytes(b"x")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
        paths = [str(folder / f"{shard:05d}.{e}") for e in ("tar", "parquet")] + [
            str(folder / f"{shard:05d}_stats.json")
        ]
        ledger.record_existing(f"{shard:05d}", paths, rows=per_shard)
    return cfg


def feature_rows(cfg: Config, encoder_id: str) -> list[tuple]:
    files = Ledger.reader(Workspace(cfg.workspace), "extract", f"{encoder_id}.s").files(".parquet")
    parts = [f for f in files if os.path.basename(f).startswith("part-")]
    return duckdb.sql(f"SELECT uid, caption FROM read_parquet({parts!r})").fetchall() if parts else []


def test_exactly_once_with_failures_recorded_and_retried(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path)
    result = extract.run(cfg)
    (src,) = result.sources
    assert src.shards == 2 and set(src.failed_shards) == {"00001", "00002"}
    assert all("Error" in err for err in src.failed_shards.values())
    assert src.rows == 2 * 6 and src.failures == 2 * 2  # per good shard: 6 features, a decode and an empty caption
    rows = feature_rows(cfg, result.encoder_id)
    assert len(rows) == len({u for u, _ in rows}) == 12
    ws = Workspace(cfg.workspace)
    ledger = Ledger.reader(ws, "extract", f"{result.encoder_id}.s")
    assert set(ledger.failures()) == {"00001", "00002"}
    fails = duckdb.sql(
        f"SELECT reason FROM read_parquet({[f for f in ledger.files('.parquet') if 'failures-' in f]!r})"
    ).fetchall()
    assert sorted(r[0].split(":")[0] for r in fails) == ["decode", "decode", "empty_caption", "empty_caption"]
    meta = features.read_meta(ws, result.encoder_id)
    assert meta["settings"]["encoder_id"] == result.encoder_id and len(meta["placeholder"]) == 1024

    again = extract.run(cfg)  # the committed shards are skipped, the failed ones tried again (and fail again)
    assert again.sources[0].new_shards == 0 and set(again.sources[0].failed_shards) == {"00001", "00002"}
    folder = Path(cfg.workspace) / "shards" / "s"
    for shard in (1, 2):  # repaired downloads are picked up
        write_tar(folder / f"{shard:05d}.tar", shard, 8)
    dl = Ledger(ws, "download", "s", {"test": 1})
    for shard in (1, 2):
        paths = [str(folder / f"{shard:05d}.{e}") for e in ("tar", "parquet")] + [
            str(folder / f"{shard:05d}_stats.json")
        ]
        dl.record_existing(f"{shard:05d}", paths, rows=8)
    fixed = extract.run(cfg)
    assert fixed.sources[0].new_shards == 2 and not fixed.sources[0].failed_shards
    assert fixed.sources[0].rows == 24 and len({u for u, _ in feature_rows(cfg, fixed.encoder_id)}) == 24


def test_features_equal_the_encoder_called_directly(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path, shards=1, broken=False)
    result = extract.run(cfg)
    ws = Workspace(cfg.workspace)
    part = ws.features(result.encoder_id, "s", "part-00000.parquet")
    table = duckdb.sql(f"SELECT uid, caption, image_emb, text_emb, clip_score FROM '{part}' ORDER BY uid").fetchall()
    encoder = ImageBind.load("tiny", vocab=cfg.model.imagebind_vocab, device="cpu", dtype="float32", seed=cfg.seed)
    by_uid = {}
    for i in range(8):
        _, files, failure = sample_files(i, 0)
        if failure is None:
            by_uid[json.loads(files["json"])["uid"]] = files
    assert {r[0] for r in table} == set(by_uid)
    images = encoder.embed_images([by_uid[r[0]]["jpg"] for r in table])
    texts = encoder.embed_texts([r[1] for r in table])
    stored_img = torch.tensor([r[2] for r in table], dtype=torch.float32)
    stored_txt = torch.tensor([r[3] for r in table], dtype=torch.float32)
    assert torch.nn.functional.cosine_similarity(stored_img, images).min() >= 0.999
    assert torch.nn.functional.cosine_similarity(stored_txt, texts).min() >= 0.999
    torch.testing.assert_close(torch.tensor([r[4] for r in table]), (images * texts).sum(-1), atol=2e-3, rtol=0)
    zeros = encoder.encode({"vision": torch.zeros(1, 3, 224, 224)})["vision"][0]
    stored = torch.from_numpy(features.placeholder(ws, result.encoder_id))
    torch.testing.assert_close(stored, zeros, atol=1e-3, rtol=0)  # stored in fp16, as every feature


def test_changed_settings_into_the_same_feature_set_are_refused(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path, shards=1, broken=False)
    extract.run(cfg)
    changed = cfg.model_copy(deep=True)
    changed.extract.dtype = "bfloat16"
    with pytest.raises(LedgerConflict, match="dtype: 'float32' -> 'bfloat16'"):
        extract.run(changed)
    other_vocab = tmp_path / "other.txt.gz"
    write_vocab(other_vocab, learn_merges(["completely different words here"] * 3, 20))
    changed = cfg.model_copy(deep=True)
    changed.model.imagebind_vocab = str(other_vocab)
    with pytest.raises(LedgerConflict, match="vocab"):
        extract.run(changed)
    other_seed = cfg.model_copy(update={"seed": 1})  # other weights: another feature set, not a conflict
    assert extract.run(other_seed).encoder_id == "imagebind-tiny-init1"


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((40, 50, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_hostile_tar(path: Path) -> dict[str, bytes]:
    """A shard with one real sample (000000600), members that must fail their own sample, and json-less samples."""
    real = {"jpg": jpeg(1), "txt": b"a red circle", "json": json.dumps({"uid": "real", "url": "http://h/600"}).encode()}
    with tarfile.open(path, "w") as tf:
        add_member(tf, "../../x/000000600.jpg", jpeg(2))  # would replace the real image if keyed by basename
        for ext, data in real.items():
            add_member(tf, f"000000600.{ext}", data)
        add_member(tf, "/abs/000000601.jpg", jpeg(3))
        add_member(tf, "000000601.txt", b"an absolute path's neighbour")
        add_member(tf, "000000602.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tf, "000000602.txt", b"a symlink")
        add_member(tf, "000000603.jpg", kind=tarfile.LNKTYPE, link="000000600.jpg")
        add_member(tf, "000000604.jpg", kind=tarfile.CHRTYPE)
        add_member(tf, "000000605.jpg", jpeg(4))
        add_member(tf, "000000605.jpg", jpeg(5))  # the same member twice
        add_member(tf, "000000605.txt", b"twice")
        add_member(tf, "000000700.jpg", jpeg(6))  # no json: a uid of its own
        add_member(tf, "000000700.txt", b"no json \x00 here\n" + b"x" * 1_000_000)
        add_member(tf, "sub/000000700.jpg", jpeg(7))
        add_member(tf, "sub/000000700.txt", b"no json either")
        add_member(tf, "000000800.png", png_claiming(20_000, 20_000))
        add_member(tf, "000000800.txt", b"a huge picture in a tiny file")
        add_member(tf, "000000900.jpg", jpeg(8))
        add_member(tf, "000000900.json", b"{not json")
        add_member(tf, "000000901.jpg", jpeg(9))
        add_member(tf, "000000901.json", b"[1, 2]")
    return real


def test_hostile_tar_members_fail_their_own_sample(tmp_path: Path) -> None:
    real = write_hostile_tar(tmp_path / "00000.tar")
    item = {
        "kind": "shard",
        "source": "s",
        "shard": "00000",
        "tar": str(tmp_path / "00000.tar"),
        "input": "x",
        "sha256": hashlib.sha256((tmp_path / "00000.tar").read_bytes()).hexdigest(),
    }
    rows = extract_read.shard_rows(item, str(tmp_path), {}, caption_max_chars=40)
    vocab = tmp_path / "vocab.txt.gz"
    write_vocab(vocab, learn_merges(CAPTIONS * 4, 40))
    cols = extract_read.prepare(rows, vocab.read_bytes(), max_pixels=10_000_000)
    by_uid = {u: i for i, u in enumerate(cols["uid"])}
    reasons = {str(u): str(r) for u, r in zip(cols["uid"], cols["reason"], strict=True)}
    assert len(by_uid) == len(rows) == 13 and all(k == "sample" for k in cols["kind"])
    i = by_uid["real"]
    assert reasons["real"] == "" and cols["caption"][i] == "a red circle"
    assert np.array_equal(cols["pixels"][i], np.asarray(resize_crop(load_image(real["jpg"]))))  # the real image

    def uid(key: str) -> str:
        return make_uid("s", f"00000.tar#{key}")

    assert reasons[uid("../../x/000000600")] == "unsafe_member: ../../x/000000600.jpg is a '..' component"
    assert reasons[uid("/abs/000000601")] == "unsafe_member: /abs/000000601.jpg is an absolute path"
    assert reasons[uid("000000601")].startswith("decode: cannot decode image <0 bytes>")  # its image never arrived
    assert reasons[uid("000000602")] == "unsafe_member: 000000602.jpg is a symbolic link"
    assert reasons[uid("000000603")] == "unsafe_member: 000000603.jpg is a hard link"
    assert reasons[uid("000000604")] == "unsafe_member: 000000604.jpg is a character device"
    assert reasons[uid("000000605")] == "duplicate_member: 000000605.jpg appears more than once"
    assert reasons[uid("000000700")] == reasons[uid("sub/000000700")] == ""  # two json-less samples, two uids
    assert (
        cols["caption"][by_uid[uid("000000700")]] == "no json   here " + "x" * 25
    )  # NUL and newline to spaces, 40 chars
    assert reasons[uid("000000900")].startswith("bad_json: Expecting property name")
    assert reasons[uid("000000901")] == "bad_json: a list, not an object"
    too_large = reasons[uid("000000800")]
    assert too_large.startswith("too_large: image <") and "400000000 pixels" in too_large
    assert extract_read.shard_rows(item, str(tmp_path), {}) == extract_read.shard_rows(item, str(tmp_path), {})


def test_a_tar_changed_after_its_download_commit_is_not_read(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path, shards=2, per_shard=4, broken=False)
    ws = Workspace(cfg.workspace)
    items = extract.shard_items(ws, "s")
    assert [it["sha256"] for it in items] == [hashlib.sha256(Path(it["tar"]).read_bytes()).hexdigest() for it in items]
    folder = Path(cfg.workspace) / "shards" / "s"
    write_hostile_tar(folder / "00000.tar")  # changed after the commit: hostile or not, it is never read
    rows = extract_read.shard_rows({**items[0], "kind": "shard"}, ws.root, {})
    assert [r["kind"] for r in rows] == ["shard_error"]
    assert rows[0]["error"].startswith(f"{items[0]['tar']} changed after its download was committed (sha256 ")
    assert rows[0]["caption"] == ""  # the error has its own column

    cfg.model.max_image_pixels = 1000  # the JPEGs of shard 1 are 80 wide, 60 and more high: all too large
    result = extract.run(cfg)
    (src,) = result.sources
    assert (
        set(src.failed_shards) == {"00000"} and "changed after its download was committed" in src.failed_shards["00000"]
    )
    assert "ibllm download" in src.failed_shards["00000"]
    ledger = Ledger.reader(ws, "extract", f"{result.encoder_id}.s")
    assert set(ledger.failures()) == {"00000"} and set(ledger.committed()) == {"00001"}
    fails = ledger.files(".parquet")
    reasons = duckdb.sql(f"SELECT reason FROM read_parquet({[f for f in fails if 'failures-' in f]!r})").fetchall()
    assert src.rows == 0 and sorted(r[0].split(":")[0] for r in reasons) == [
        "decode",
        "too_large",
        "too_large",
        "too_large",
    ]

    write_hostile_tar(folder / "00001.tar")  # a shard already extracted: current by its download record, never reread
    again = extract.run(cfg).sources[0]
    assert again.new_shards == 0 and set(again.failed_shards) == {"00000"} and again.shards == 1


@pytest.mark.slow
def test_killed_at_random_moments_ends_exactly_once(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path, shards=8, per_shard=12, broken=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rng = random.Random(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    leases = Path(cfg.workspace) / "leases" / "extract"
    for attempt in range(3):
        command = [sys.executable, "-m", "flows.cli", "extract", "-c", str(path)]
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        started = time.time()
        if attempt == 0:  # a second extraction while the first runs is refused (the second and third attempts
            while not list(leases.glob("*.json")) and time.time() - started < 60:  # take over a killed run's lease)
                time.sleep(0.1)
            second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert second.returncode == 6, second.stderr[-2000:]
            assert "is being written by another run" in second.stderr
        time.sleep(max(0.0, rng.uniform(4.0, 12.0) - (time.time() - started)))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = extract.run(load_config(path))
    rows = feature_rows(cfg, result.encoder_id)
    assert len(rows) == len({u for u, _ in rows}) == 8 * 10  # 12 samples a shard, 2 of them fail
    ws = Workspace(cfg.workspace)
    ledger = Ledger.reader(ws, "extract", f"{result.encoder_id}.s")
    on_disk = sorted(str(p) for p in Path(ws.features(result.encoder_id, "s")).iterdir())
    assert on_disk == sorted(ledger.files())  # nothing half-written, nothing unrecorded
