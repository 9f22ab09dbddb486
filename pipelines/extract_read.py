"""Extraction's CPU readers: a shard's tar to decoded, cropped, tokenized columns, with PIL and numpy (no torch)."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections import defaultdict
from typing import Any

import numpy as np

from model.imagebind.decode import IMAGE_SIZE, load_image, resize_crop
from model.imagebind.tokenizer import CONTEXT_LENGTH, Tokenizer
from stores.metadata import make_uid
from stores.workspace import Workspace

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_COLUMNS = ("kind", "source", "shard", "tar", "input", "uid", "url", "caption", "reason")


def read_tar(data: bytes) -> dict[str, dict[str, bytes]]:
    """Members of a webdataset tar grouped by sample key: {key: {ext: bytes}}; a damaged tar raises."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = os.path.basename(member.name).partition(".")
            f = tf.extractfile(member)
            if f is None:
                continue
            content = f.read()
            if len(content) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated")
            samples[key][ext] = content
    return dict(samples)


def shard_rows(item: dict[str, Any], root: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard's samples as raw rows (image bytes); a shard that cannot be read becomes a `shard_error` row."""
    base = {k: str(item[k]) for k in ("source", "shard", "tar", "input")}
    if item["kind"] == "placeholder":  # encoded by the actor like any sample, so the model loads only there
        return [{**base, "kind": "placeholder", "uid": "", "url": "", "caption": "", "image": b""}]
    try:
        samples = read_tar(Workspace(root, storage_options).read_bytes(base["tar"]))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        return [{**base, "kind": "shard_error", "uid": "", "url": "", "caption": f"{type(e).__name__}: {e}",
                 "image": b""}]  # fmt: skip
    rows = []
    for key in sorted(samples):
        parts = samples[key]
        meta = json.loads(parts.get("json", b"{}") or b"{}")
        url = meta.get("url") or ""
        caption = parts["txt"].decode("utf-8", "replace") if "txt" in parts else meta.get("caption") or ""
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), b"")
        uid = meta.get("uid") or make_uid(base["source"], url)
        rows.append({**base, "kind": "sample", "uid": uid, "url": url, "caption": caption, "image": img})
    return rows or [{**base, "kind": "empty", "uid": "", "url": "", "caption": "", "image": b""}]


@functools.lru_cache(maxsize=4)
def _tokenizer(digest: str, vocab: bytes) -> Tokenizer:
    path = os.path.join(tempfile.gettempdir(), f"ibllm-vocab-{digest}.txt.gz")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(vocab)
        os.replace(tmp, path)
    return Tokenizer(path)


def prepare(rows: list[dict[str, Any]], vocab: bytes) -> dict[str, np.ndarray]:
    """Decode and crop each row's image to uint8 (224, 224, 3) and tokenize its caption, as columns; a sample that
    fails gets a reason (and zero pixels and tokens) instead of stopping the shard."""
    n = len(rows)
    pixels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    tokens = np.zeros((n, CONTEXT_LENGTH), np.int64)
    reasons = [""] * n
    tokenizer = _tokenizer(hashlib.sha256(vocab).hexdigest()[:16], vocab)
    for i, row in enumerate(rows):
        caption = row["caption"].strip()
        if row["kind"] != "sample":
            continue
        if not caption:
            reasons[i] = "empty_caption"
            continue
        try:
            pixels[i] = np.asarray(resize_crop(load_image(row["image"])))
            tokens[i] = tokenizer.rows([caption])[0]
        except (ValueError, OSError) as e:
            reasons[i] = f"decode: {e}"[:300]
    samples = sum(r["kind"] == "sample" for r in rows)
    columns = {k: np.array([r[k] for r in rows] if k != "reason" else reasons, dtype=object) for k in TEXT_COLUMNS}
    return {**columns, "shard_rows": np.full(n, samples, np.int64), "pixels": pixels, "tokens": tokens}


def read_shards(items: dict[str, np.ndarray], root: str, storage_options: dict[str, Any], vocab: bytes) -> dict:
    """A Ray Data batch of shard work items (one, as extraction runs it) -> every sample of those shards, as columns."""
    parts = [
        prepare(shard_rows({k: v[i] for k, v in items.items()}, root, storage_options), vocab)
        for i in range(len(items["kind"]))
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
