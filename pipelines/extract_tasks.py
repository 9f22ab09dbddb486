"""The steps of feature extraction that run on Ray workers: read a shard, preprocess samples, encode in an actor."""

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
import torch

from model.imagebind import image as image_ops
from model.imagebind.encoder import ImageBind
from model.imagebind.tokenizer import Tokenizer
from stores.metadata import make_uid
from stores.workspace import Workspace

SIZE = image_ops.IMAGE_SIZE
CONTEXT = 77
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def read_shard(item: dict[str, Any], root: str, storage_options: dict[str, Any], vocab: bytes) -> list[dict[str, Any]]:
    """One shard's samples, decoded, cropped and tokenized, as rows; an unreadable shard is one `shard_error` row."""
    return [prepare(row, vocab) for row in shard_rows(item, root, storage_options)]


def shard_rows(item: dict[str, Any], root: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard's samples as raw rows (image bytes); a shard that cannot be read becomes a `shard_error` row."""
    base = {k: item[k] for k in ("source", "shard", "tar", "input")}
    if item["kind"] == "placeholder":  # encoded by the actor like any sample, so the model loads only there
        return [{**base, "kind": "placeholder", "shard_rows": 0, "uid": "", "url": "", "caption": "", "image": b""}]
    try:
        samples = read_tar(Workspace(root, storage_options).read_bytes(item["tar"]))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        return [{**base, "kind": "shard_error", "shard_rows": 0, "uid": "", "url": "",
                 "caption": f"{type(e).__name__}: {e}", "image": b""}]  # fmt: skip
    rows = []
    for key in sorted(samples):
        parts = samples[key]
        meta = json.loads(parts.get("json", b"{}") or b"{}")
        url = meta.get("url") or ""
        caption = parts["txt"].decode("utf-8", "replace") if "txt" in parts else meta.get("caption") or ""
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), b"")
        uid = meta.get("uid") or make_uid(item["source"], url)
        rows.append({**base, "kind": "sample", "uid": uid, "url": url, "caption": caption, "image": img})
    for r in rows:
        r["shard_rows"] = len(rows)
    return rows or [{**base, "kind": "empty", "shard_rows": 0, "uid": "", "url": "", "caption": "", "image": b""}]


@functools.lru_cache(maxsize=4)
def _tokenizer(digest: str, vocab: bytes) -> Tokenizer:
    path = os.path.join(tempfile.gettempdir(), f"ibllm-vocab-{digest}.txt.gz")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(vocab)
        os.replace(tmp, path)
    return Tokenizer(path)


def prepare(row: dict[str, Any], vocab: bytes) -> dict[str, Any]:
    """Decode and crop a sample's image to uint8 (224, 224, 3) and tokenize its caption; failures get a reason."""
    pixels, tokens, reason = np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros(CONTEXT, np.int64), ""
    caption = str(row["caption"]).strip()
    if row["kind"] != "sample":
        pass
    elif not caption:
        reason = "empty_caption"
    else:
        try:
            pixels = np.asarray(image_ops.resize_crop(image_ops.load_image(bytes(row["image"]))))
            tokens = _tokenizer(hashlib.sha256(vocab).hexdigest()[:16], vocab)([caption])[0].numpy()
        except (ValueError, OSError) as e:
            reason = f"decode: {e}"[:300]
    out = {k: v for k, v in row.items() if k != "image"}
    return {**out, "pixels": pixels, "tokens": tokens, "reason": reason}


class Encoder:
    """A Ray actor: loads ImageBind once, then embeds batches of preprocessed samples."""

    def __init__(self, preset: str, checkpoint: str | None, seed: int, device: str, dtype: str, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.encoder = ImageBind.load(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, dim = len(batch["kind"]), self.encoder.dim
        image_emb = np.zeros((n, dim), np.float16)
        text_emb = np.zeros((n, dim), np.float16)
        score = np.zeros(n, np.float32)
        ok = np.array([k == "sample" and not r for k, r in zip(batch["kind"], batch["reason"], strict=True)])
        holder = np.array([k == "placeholder" for k in batch["kind"]])
        if holder.any():  # the paper's "fake image": the all-zero preprocessed image
            zeros = torch.zeros(int(holder.sum()), 3, SIZE, SIZE)
            image_emb[holder] = self.encoder.encode({"vision": zeros})["vision"].numpy()
        if ok.any():
            pixels = image_ops.normalize_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
            emb = self.encoder.encode({"vision": pixels, "text": torch.from_numpy(batch["tokens"][ok])})
            image_emb[ok], text_emb[ok] = emb["vision"].numpy(), emb["text"].numpy()
            score[ok] = (emb["vision"] * emb["text"]).sum(-1).numpy()
        out = {k: v for k, v in batch.items() if k not in ("pixels", "tokens")}
        return {**out, "image_emb": image_emb, "text_emb": text_emb, "clip_score": score}
