"""FP8 for the vision trunk: what can be checked without a GPU (refusals, the packed projection as a module)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from model.imagebind import fp8
from model.imagebind.encoder import ImageBind
from model.imagebind.layers import Attention

CUDA = torch.device("cuda")


@pytest.fixture
def no_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError, installed or not


def gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_refused_without_a_gpu_of_capability_8_9(monkeypatch: pytest.MonkeyPatch, no_torchao: None) -> None:
    with pytest.raises(fp8.FP8Unavailable, match=r"needs a CUDA GPU of compute capability >= 8\.9 .* runs on cpu"):
        fp8.require_fp8(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(fp8.FP8Unavailable, match="FP8 needs a CUDA GPU"):
        ImageBind.load("tiny", device="cpu", dtype="bfloat16", weights="cast", fp8=True)
    gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(fp8.FP8Unavailable, match=r"NVIDIA A100-SXM4-80GB has 8\.0: set extract\.fp8 false"):
        fp8.require_fp8(CUDA, torch.bfloat16)


def test_refused_without_bf16_weights_or_torchao(monkeypatch: pytest.MonkeyPatch, no_torchao: None) -> None:
    gpu(monkeypatch, (9, 0), "NVIDIA H200")
    with pytest.raises(fp8.FP8Unavailable, match="over bfloat16 weights, not float16"):
        fp8.require_fp8(CUDA, torch.float16)
    with pytest.raises(fp8.FP8Unavailable, match="over bfloat16 weights, not float32"):
        fp8.require_fp8(CUDA, torch.float32)
    with pytest.raises(fp8.FP8Unavailable, match=r"needs torchao, which is not installed: pip install 'ibllm\[fp8\]'"):
        fp8.require_fp8(CUDA, torch.bfloat16)
    gpu(monkeypatch, (8, 9), "NVIDIA L4")  # Ada passes the capability check
    with pytest.raises(fp8.FP8Unavailable, match="torchao"):
        fp8.require_fp8(CUDA, torch.bfloat16)


def test_check_fp8_wants_a_float32_encoder_on_a_gpu(no_torchao: None) -> None:
    images = torch.randn(2, 3, 224, 224)
    low = ImageBind.load("tiny", device="cpu", dtype="bfloat16", weights="cast", seed=0)
    with pytest.raises(ValueError, match="weights='float32'"):
        fp8.check_fp8(low, images)
    with pytest.raises(fp8.FP8Unavailable, match="runs on cpu"):
        fp8.check_fp8(ImageBind.load("tiny", device="cpu", dtype="float32", seed=0), images)


def test_packed_projection_as_a_module_changes_nothing() -> None:
    encoder = ImageBind.load("tiny", device="cpu", dtype="float32", seed=0)
    model = copy.deepcopy(encoder.model)
    trunk = model.modality_trunks["vision"]
    fp8.pack_projections(trunk)
    attentions = [m for m in trunk.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(a.in_proj, torch.nn.Linear) for a in attentions)
    assert not any(name.endswith("attn.in_proj_weight") for name, _ in trunk.named_parameters())
    packed = ImageBind(model, None, encoder.device, torch.float32, encoder.encoder_id)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(packed.encode({"vision": x})["vision"], encoder.encode({"vision": x})["vision"])
    other = model.modality_trunks["text"].blocks[0].attn  # the other towers keep their raw parameters
    assert other.in_proj is None and other.in_proj_weight.shape[0] == 3 * other.in_proj_weight.shape[1]
