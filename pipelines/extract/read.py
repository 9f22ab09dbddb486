"""Extraction's CPU readers: a shard's tar to decoded, cropped, tokenized columns, with PIL and numpy (no torch)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
import tempfile
from typing import Any

import numpy as np

from model.imagebind.decode import IMAGE_SIZE, TooManyPixels, load_image, resize_crop
from model.imagebind.tokenizer import CONTEXT_LENGTH, Tokenizer
from pipelines.extract.tar import read_tar
from stores.metadata import CAPTION_MAX_CHARS, clean_caption, make_uid
from stores.workspace import Workspace

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_COLUMNS = ("kind", "source", "shard", "tar", "input", "uid", "url", "caption", "reason", "error")


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _shard_error(base: dict[str, str], message: str) -> list[dict[str, Any]]:
    return [
        {
            **base,
            "kind": "shard_error",
            "uid": "",
            "url": "",
            "caption": "",
            "image": b"",
            "reason": "",
            "error": message,
        }
    ]


def _changed(base: dict[str, str], expected: str, data: bytes) -> str | None:
    """Why the tar's bytes are not the ones its download committed (None when they are, or none were recorded)."""
    actual = hashlib.sha256(data).hexdigest()
    if not expected or actual == expected:
        return None
    return (
        f"{base['tar']} changed after its download was committed (sha256 {actual[:16]}, the download ledger "
        f"recorded {expected[:16]}), so it is not read: restore the file, or download the shard again (remove "
        "its record from the download ledger, then `ibllm download`)"
    )


def _sample(
    base: dict[str, str], key: str, parts: dict[str, bytes], refused: str | None, caption_max_chars: int
) -> dict[str, Any]:
    """One sample's raw row; metadata that is not a JSON object, or a refused member, fails it with a reason."""
    reason = refused or ""
    try:
        meta = json.loads(parts.get("json") or b"{}")
    except ValueError as e:
        meta, reason = {}, reason or f"bad_json: {e}"
    if not isinstance(meta, dict):
        meta, reason = {}, reason or f"bad_json: a {type(meta).__name__}, not an object"
    url = _text(meta.get("url"))
    text = parts["txt"].decode("utf-8", "replace") if "txt" in parts else _text(meta.get("caption"))
    img = next((parts[e] for e in IMAGE_EXTS if e in parts), b"")
    uid = _text(meta.get("uid")) or make_uid(base["source"], f"{base['shard']}.tar#{key}")  # unique per member
    return {
        **base,
        "kind": "sample",
        "uid": uid,
        "url": url,
        "caption": clean_caption(text, caption_max_chars),
        "image": img,
        "reason": reason,
        "error": "",
    }


def shard_rows(
    item: dict[str, Any], root: str, storage_options: dict[str, Any], caption_max_chars: int = CAPTION_MAX_CHARS
) -> list[dict[str, Any]]:
    """One shard's samples as raw rows (image bytes, cleaned captions, a reason where a sample already failed).

    A shard whose tar cannot be read, or whose bytes differ from the sha256 its download committed (`item["sha256"]`),
    becomes a `shard_error` row.
    """
    base = {k: str(item[k]) for k in ("source", "shard", "tar", "input")}
    try:
        data = Workspace(root, storage_options).read_bytes(base["tar"])
        changed = _changed(base, str(item.get("sha256") or ""), data)
        if changed:
            return _shard_error(base, changed)
        samples = read_tar(data)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        return _shard_error(base, f"{type(e).__name__}: {e}")
    rows = [
        _sample(base, key, samples.parts.get(key, {}), samples.refused.get(key), caption_max_chars)
        for key in samples.sample_keys()
    ]
    return rows or [
        {**base, "kind": "empty", "uid": "", "url": "", "caption": "", "image": b"", "reason": "", "error": ""}
    ]


@functools.lru_cache(maxsize=4)
def _tokenizer(digest: str, vocab: bytes) -> Tokenizer:
    path = os.path.join(tempfile.gettempdir(), f"ibllm-vocab-{digest}.txt.gz")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(vocab)
        os.replace(tmp, path)
    return Tokenizer(path)


def prepare(rows: list[dict[str, Any]], vocab: bytes, max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Decode and crop each row's image to uint8 (224, 224, 3) and tokenize its caption, as columns; a sample that
    fails (an image above `max_pixels` pixels is refused before decoding) gets a reason (and zero pixels and
    tokens) instead of stopping the shard."""
    n = len(rows)
    pixels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    tokens = np.zeros((n, CONTEXT_LENGTH), np.int64)
    reasons = [str(r.get("reason") or "") for r in rows]
    tokenizer = _tokenizer(hashlib.sha256(vocab).hexdigest()[:16], vocab)
    for i, row in enumerate(rows):
        caption = row["caption"].strip()
        if row["kind"] != "sample" or reasons[i]:
            continue
        if not caption:
            reasons[i] = "empty_caption"
            continue
        try:
            pixels[i] = np.asarray(resize_crop(load_image(row["image"], max_pixels=max_pixels)))
            tokens[i] = tokenizer.rows([caption])[0]
        except TooManyPixels as e:
            reasons[i] = f"too_large: {e}"[:300]
        except (ValueError, OSError) as e:
            reasons[i] = f"decode: {e}"[:300]
    samples = sum(r["kind"] == "sample" for r in rows)
    columns = {k: np.array([r[k] for r in rows] if k != "reason" else reasons, dtype=object) for k in TEXT_COLUMNS}
    return {**columns, "shard_rows": np.full(n, samples, np.int64), "pixels": pixels, "tokens": tokens}


def read_shards(
    items: dict[str, np.ndarray],
    root: str,
    storage_options: dict[str, Any],
    vocab: bytes,
    caption_max_chars: int = CAPTION_MAX_CHARS,
    max_pixels: int | None = None,
) -> dict:
    """A Ray Data batch of shard work items (one, as extraction runs it) -> every sample of those shards, as columns."""
    parts = [
        prepare(
            shard_rows({k: v[i] for k, v in items.items()}, root, storage_options, caption_max_chars), vocab, max_pixels
        )
        for i in range(len(items["kind"]))
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
