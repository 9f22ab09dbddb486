"""Extraction's encoder actor: ImageBind loaded once, embedding batches of decoded samples (CPU or one GPU)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.imagebind.encoder import ImageBind
from model.imagebind.image import IMAGE_SIZE, normalize_pixels

CALLS_IN_FLIGHT = 2  # on a GPU: Ray Data may run this many calls of one actor at once (see `Encoder`)


@dataclass
class Pending:
    """A batch whose embeddings are being computed: `done` (a CUDA event, None on the CPU) marks when `emb` (the
    image then the text embeddings, (k, 2 x dim) float16) and `score` ((k,) float32) hold them, host-side."""

    rows: dict[str, np.ndarray]
    ok: np.ndarray
    emb: torch.Tensor | None
    score: torch.Tensor | None
    done: Any = None


class Encoder:
    """A Ray actor: loads ImageBind once, then embeds batches of preprocessed samples (both towers in one call).

    Every torch call runs on one thread of its own. Ray Data calls the UDF from a worker thread while the actor was
    built on the main thread; OpenMP keeps a thread team per calling thread, and once libgomp manages more threads
    than there are cores it stops spinning at barriers: 12% slower batches on 2 cores.

    On a GPU a call is split in two. `_submit`, on the torch thread, copies the uint8 pixels and the token ids into
    pinned host memory, starts their host-to-device copy on a side stream, makes the compute stream wait for it,
    enqueues both towers and the copy of the float16 results back into pinned memory, and returns without waiting.
    `_finish`, on Ray's calling thread, waits for that batch only. With `CALLS_IN_FLIGHT` calls of the actor at
    once (the stage sets it for GPU actors), batch i+1's host copy, host-to-device copy and kernel launches happen
    while the GPU computes batch i, and batch i's results are turned into columns and handed to Ray while the GPU
    computes batch i+1: the GPU does not wait for Ray between batches. On the CPU nothing is pinned or overlapped.
    """

    def __init__(
        self, preset: str, checkpoint: str | None, seed: int, device: str, dtype: str, threads: int, fp8: bool = False
    ) -> None:
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        loading = self.torch_thread.submit(self._load, preset, checkpoint, seed, device, dtype, threads, fp8)
        self._use(loading.result())

    @classmethod
    def wrapping(cls, encoder: ImageBind) -> Encoder:
        """The actor around an ImageBind loaded already (benchmarks, tests); its torch calls run on a thread of
        their own as the actor's do."""
        self = cls.__new__(cls)
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._use(encoder)
        return self

    def _use(self, encoder: ImageBind) -> None:
        self.encoder = encoder
        self.gpu = encoder.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(encoder.device) if self.gpu else None

    @staticmethod
    def _load(
        preset: str, checkpoint: str | None, seed: int, device: str, dtype: str, threads: int, fp8: bool
    ) -> ImageBind:
        torch.set_num_threads(max(1, threads))
        return ImageBind.load(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=seed, fp8=fp8)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._finish(self.torch_thread.submit(self._submit, batch).result())

    def _encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch, start to end, on the calling thread."""
        return self._finish(self._submit(batch))

    @torch.inference_mode()
    def _submit(self, batch: dict[str, np.ndarray]) -> Pending:
        rows = {k: v for k, v in batch.items() if k not in ("pixels", "tokens")}
        ok = np.array([k == "sample" and not r for k, r in zip(batch["kind"], batch["reason"], strict=True)], bool)
        if not ok.any():
            return Pending(rows, ok, None, None)
        if self.gpu:
            return self._submit_cuda(rows, ok, batch["pixels"], batch["tokens"])
        # uint8 is normalised where the model runs: a quarter of the float copy to a device
        pixels = normalize_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        emb = self.encoder.encode({"vision": pixels, "text": torch.from_numpy(batch["tokens"][ok])})
        both = torch.cat([emb["vision"], emb["text"]], dim=1).numpy().astype(np.float16)
        return Pending(rows, ok, torch.from_numpy(both), (emb["vision"] * emb["text"]).sum(-1))

    def _submit_cuda(
        self, rows: dict[str, np.ndarray], ok: np.ndarray, pixels: np.ndarray, tokens: np.ndarray
    ) -> Pending:
        device, k = self.encoder.device, int(ok.sum())
        # the accepted rows go straight into pinned memory (one host copy); torch's pinned allocator caches the
        # buffers and keeps each one until the copies that read it are done
        host_pixels = torch.empty((k, *pixels.shape[1:]), dtype=torch.uint8, pin_memory=True)
        host_tokens = torch.empty((k, *tokens.shape[1:]), dtype=torch.from_numpy(tokens).dtype, pin_memory=True)
        np.compress(ok, pixels, axis=0, out=host_pixels.numpy())
        np.compress(ok, tokens, axis=0, out=host_tokens.numpy())
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(self.copy_stream):  # allocated and filled on the copy stream
            dev_pixels = host_pixels.to(device, non_blocking=True)
            dev_tokens = host_tokens.to(device, non_blocking=True)
        compute.wait_stream(self.copy_stream)
        for t in (dev_pixels, dev_tokens):  # their memory is not reused before the compute stream is done with them
            t.record_stream(compute)
        emb = self.encoder.encode({"vision": normalize_pixels(dev_pixels), "text": dev_tokens}, on_device=True)
        both = torch.cat([emb["vision"], emb["text"]], dim=1).half()
        score = (emb["vision"] * emb["text"]).sum(-1)
        host_emb = torch.empty(both.shape, dtype=torch.float16, pin_memory=True)
        host_score = torch.empty(score.shape, dtype=torch.float32, pin_memory=True)
        host_emb.copy_(both, non_blocking=True)
        host_score.copy_(score, non_blocking=True)
        done = torch.cuda.Event(blocking=True)  # its waiter sleeps instead of spinning on a core the readers want
        done.record(compute)
        return Pending(rows, ok, host_emb, host_score, done)

    def _finish(self, pending: Pending) -> dict[str, np.ndarray]:
        """The batch's columns with its embeddings and scores (zeros where a sample failed), once they are back."""
        n, dim, ok = len(pending.ok), self.encoder.dim, pending.ok
        image_emb = np.zeros((n, dim), np.float16)
        text_emb = np.zeros((n, dim), np.float16)
        score = np.zeros(n, np.float32)
        if pending.emb is not None:
            if pending.done is not None:
                pending.done.synchronize()  # this batch only; the GIL is released while waiting
            both = pending.emb.numpy()
            image_emb[ok], text_emb[ok] = both[:, :dim], both[:, dim:]
            score[ok] = pending.score.numpy()
        return {**pending.rows, "image_emb": image_emb, "text_emb": text_emb, "clip_score": score}


def placeholder_feature(
    preset: str, checkpoint: str | None, seed: int, device: str, dtype: str, fp8: bool = False
) -> np.ndarray:
    """The paper's "fake image" feature, what text-only samples stand on: the embedding of the all-zero preprocessed
    image, stored as the features are (float16 values, as float32)."""
    encoder = ImageBind.load(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=seed, fp8=fp8)
    emb = encoder.encode({"vision": torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)})["vision"]
    return emb.float().numpy()[0].astype(np.float16).astype(np.float32)
