"""Extraction's encoder actor: ImageBind loaded once, embedding batches of decoded samples (CPU or one GPU)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from model.imagebind.encoder import ImageBind
from model.imagebind.image import IMAGE_SIZE, normalize_pixels


class Encoder:
    """A Ray actor: loads ImageBind once, then embeds batches of preprocessed samples.

    Every torch call runs on one thread of its own. Ray Data calls the UDF from a worker thread while the actor was
    built on the main thread; OpenMP keeps a thread team per calling thread, and once libgomp manages more threads
    than there are cores it stops spinning at barriers: 12% slower batches on 2 cores.
    """

    def __init__(self, preset: str, checkpoint: str | None, seed: int, device: str, dtype: str, threads: int) -> None:
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self.encoder = self.torch_thread.submit(self._load, preset, checkpoint, seed, device, dtype, threads).result()

    @staticmethod
    def _load(preset: str, checkpoint: str | None, seed: int, device: str, dtype: str, threads: int) -> ImageBind:
        torch.set_num_threads(max(1, threads))
        return ImageBind.load(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.torch_thread.submit(self._encode, batch).result()

    def _encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, dim = len(batch["kind"]), self.encoder.dim
        image_emb = np.zeros((n, dim), np.float16)
        text_emb = np.zeros((n, dim), np.float16)
        score = np.zeros(n, np.float32)
        ok = np.array([k == "sample" and not r for k, r in zip(batch["kind"], batch["reason"], strict=True)])
        if ok.any():
            # uint8 goes to the device and is normalised there: a quarter of the float copy, and on a GPU the host
            # thread does not turn every pixel into float32 itself
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.encoder.device)
            pixels = normalize_pixels(pixels)
            emb = self.encoder.encode({"vision": pixels, "text": torch.from_numpy(batch["tokens"][ok])})
            image_emb[ok], text_emb[ok] = emb["vision"].numpy(), emb["text"].numpy()
            score[ok] = (emb["vision"] * emb["text"]).sum(-1).numpy()
        out = {k: v for k, v in batch.items() if k not in ("pixels", "tokens")}
        return {**out, "image_emb": image_emb, "text_emb": text_emb, "clip_score": score}


def placeholder_feature(preset: str, checkpoint: str | None, seed: int, device: str, dtype: str) -> np.ndarray:
    """The paper's "fake image" feature, what text-only samples stand on: the embedding of the all-zero preprocessed
    image, stored as the features are (float16 values, as float32)."""
    encoder = ImageBind.load(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=seed)
    emb = encoder.encode({"vision": torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)})["vision"]
    return emb.float().numpy()[0].astype(np.float16).astype(np.float32)
