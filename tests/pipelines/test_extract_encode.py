"""The extraction actor by itself (no Ray): what it returns equals `ImageBind.encode`, and its GPU wiring."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch

from model.imagebind.image import normalize_pixels
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.extract import encode as extract_encode
from pipelines.extract import stage as extract


@pytest.fixture(scope="module")
def actor() -> extract_encode.Encoder:
    return extract_encode.Encoder("tiny", None, seed=0, device="cpu", dtype="float32", threads=1)


def batch(n: int, failed: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    kind = np.array(["sample"] * n, dtype=object)
    reason = np.array(["decode: x" if i in failed else "" for i in range(n)], dtype=object)
    return {
        "kind": kind,
        "reason": reason,
        "uid": np.array([f"u{i}" for i in range(n)], dtype=object),
        "shard_rows": np.full(n, n, np.int64),
        "pixels": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
        "tokens": rng.integers(1, 500, (n, 77)).astype(np.int64),
    }


def test_actor_equals_the_encoder_called_directly(actor: extract_encode.Encoder) -> None:
    b = batch(5, failed=(1, 3))
    out = actor._encode(b)
    ok = np.array([True, False, True, False, True])
    emb = actor.encoder.encode(
        {"vision": normalize_pixels(torch.from_numpy(b["pixels"][ok])), "text": torch.from_numpy(b["tokens"][ok])}
    )
    assert out["image_emb"].dtype == out["text_emb"].dtype == np.float16 and out["clip_score"].dtype == np.float32
    assert np.array_equal(out["image_emb"][ok], emb["vision"].numpy().astype(np.float16))
    assert np.array_equal(out["text_emb"][ok], emb["text"].numpy().astype(np.float16))
    assert np.array_equal(out["clip_score"][ok], (emb["vision"] * emb["text"]).sum(-1).numpy())
    assert not out["image_emb"][~ok].any() and not out["text_emb"][~ok].any() and not out["clip_score"][~ok].any()
    assert "pixels" not in out and "tokens" not in out
    assert list(out["uid"]) == list(b["uid"]) and np.array_equal(out["shard_rows"], b["shard_rows"])
    again = actor(b)  # through the torch thread, as Ray calls it
    assert all(np.array_equal(again[k], out[k]) for k in ("image_emb", "text_emb", "clip_score"))


def test_actor_batch_without_samples(actor: extract_encode.Encoder) -> None:
    b = batch(2, failed=(0, 1))
    b["kind"] = np.array(["sample", "empty"], dtype=object)
    out = actor._encode(b)
    assert out["image_emb"].shape == (2, actor.encoder.dim) and not out["image_emb"].any()


def test_cpu_actor_pins_nothing(actor: extract_encode.Encoder) -> None:
    assert not actor.gpu and actor.copy_stream is None
    assert actor._submit(batch(2)).done is None  # nothing to wait for: computed in the call


class FakeDataset:
    def map_batches(self, fn: Any, **kwargs: Any) -> dict[str, Any]:
        return {"fn": fn, **kwargs}


def test_gpu_actors_take_two_calls_at_once_cpu_actors_one(tmp_path: Any) -> None:
    cfg = Config(workspace=str(tmp_path))
    args = {"preset": "tiny", "checkpoint": None, "seed": 0, "device": "cuda", "dtype": "bfloat16", "fp8": False}
    on_gpu = extract._encoder_stage(cfg, FakeDataset(), args, 1, True, {})
    strategy = on_gpu["compute"]
    assert on_gpu["num_gpus"] == 1 and strategy.max_concurrent_calls_per_actor == extract_encode.CALLS_IN_FLIGHT
    assert strategy.enable_true_multi_threading
    on_cpu = extract._encoder_stage(cfg, FakeDataset(), {**args, "device": "cpu"}, 1, False, {})["compute"]
    assert on_cpu.max_concurrent_calls_per_actor is None and not on_cpu.enable_true_multi_threading


def test_settings_name_cast_weights_and_fp8_only_when_on() -> None:
    assert extract.feature_settings("e", b"vocab", "cpu", "float32", False).keys() == {"encoder_id", "vocab", "dtype"}
    assert "weights" not in extract.feature_settings("e", b"vocab", "cpu", "bfloat16", False)  # autocast, as before
    gpu = extract.feature_settings("e", b"vocab", "cuda", "bfloat16", False)
    assert gpu["weights"] == "bfloat16" and "fp8" not in gpu
    assert extract.feature_settings("e", b"vocab", "cuda", "bfloat16", True)["fp8"] is True
    for device, dtype in (("cpu", "bfloat16"), ("cuda", "float16"), ("cuda", "float32")):
        with pytest.raises(InputError, match=r"extract\.fp8 needs a CUDA GPU"):
            extract.feature_settings("e", b"vocab", device, dtype, True)


def test_placeholder_refuses_fp8_on_the_cpu() -> None:
    with pytest.raises(RuntimeError, match="FP8 needs a CUDA GPU"):
        extract_encode.placeholder_feature("tiny", None, 0, "cpu", "bfloat16", fp8=True)


class FakeCuda:
    """Stands in for torch.cuda's streams and events on the CPU, logging the order the actor uses them in."""

    def __init__(self) -> None:
        self.log: list[str] = []
        cuda = self

        class Stream:
            def __init__(self, name: str) -> None:
                self.name = name

            def wait_stream(self, other: Stream) -> None:
                cuda.log.append(f"{self.name} waits for {other.name}")

        class Event:
            def __init__(self, blocking: bool = False) -> None:
                assert blocking  # the waiting thread sleeps

            def record(self, stream: Stream) -> None:
                cuda.log.append(f"done recorded on {stream.name}")

            def synchronize(self) -> None:
                cuda.log.append("done waited for")

        self.copy, self.compute, self.Event = Stream("copy"), Stream("compute"), Event

    @contextlib.contextmanager
    def stream(self, s: Any) -> Any:
        self.log.append(f"enter {s.name}")
        yield
        self.log.append(f"leave {s.name}")


def test_gpu_path_data_flow_on_fake_streams(actor: extract_encode.Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    # Streams, events and pinned memory are faked (no CUDA here): this checks what the GPU path computes and the
    # order of its stream calls, not that copies overlap compute.
    fake, empty = FakeCuda(), torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "stream", fake.stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.compute)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: fake.log.append(f"{t.dtype} kept for {s.name}"))
    b = batch(6, failed=(0, 4))
    expected = actor._encode(b)
    monkeypatch.setattr(actor, "gpu", True)
    monkeypatch.setattr(actor, "copy_stream", fake.copy)
    pending = actor._submit(b)
    assert fake.log == [
        "enter copy",
        "leave copy",
        "compute waits for copy",
        "torch.uint8 kept for compute",
        "torch.int64 kept for compute",
        "done recorded on compute",
    ]
    out = actor._finish(pending)
    assert fake.log[-1] == "done waited for"
    for k in ("image_emb", "text_emb", "clip_score"):
        assert out[k].dtype == expected[k].dtype and np.array_equal(out[k], expected[k]), k
