"""`ibllm convert`: the three layouts end to end through the command line, and bad input as exit code 4."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from flows.cli import main
from model.llm.checkpoint import from_pretrained
from model.weights import CheckpointMismatch
from tests.model.meta_reference import meta_forward, meta_visual
from tests.model.official_fixture import TINY, official_weights, reference_state, write_meta_llama


def test_convert_llama_adapter_export_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    llama, adapter = official_weights(TINY, seed=2)
    meta = write_meta_llama(str(tmp_path / "llama" / "tiny"), llama)
    (tmp_path / "llama" / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    torch.save({"model": adapter}, tmp_path / "7B.pth")

    assert main(["convert", "llama", meta, str(tmp_path / "hf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == len(llama)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    assert main(["convert", "adapter", str(tmp_path / "7B.pth"), str(tmp_path / "ours"), "--vocab-size", "96"]) == 0
    assert main(["convert", "export", str(tmp_path / "ours"), str(tmp_path / "new" / "back.pth")]) == 0  # made
    back = torch.load(tmp_path / "new" / "back.pth", weights_only=True)["model"]
    assert back.keys() == adapter.keys() and all(torch.equal(back[k], adapter[k]) for k in adapter)
    # and back again: the vocabulary and the metadata travel with the export; folders and files follow the umask
    assert main(["convert", "adapter", str(tmp_path / "new" / "back.pth"), str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["config"]["vocab_size"] == 96 and again["metadata"]["converted_from"].endswith("back.pth")
    first = json.loads((tmp_path / "ours" / "config.json").read_text())["metadata"]["converted_from"]
    assert again["metadata"] == {"converted_from": str(tmp_path / "new" / "back.pth")} and first.endswith("7B.pth")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "again").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "again" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    # a released file says nothing of the vocabulary: 32000, and a base with another names --vocab-size
    assert main(["convert", "adapter", str(tmp_path / "7B.pth"), str(tmp_path / "llama32k")]) == 0
    with pytest.raises(CheckpointMismatch, match=r"vocab_size=32000.*convert it again with --vocab-size 96"):
        from_pretrained(str(tmp_path / "llama32k"), str(tmp_path / "hf"))

    # the converted pair runs as the reference does
    model = from_pretrained(str(tmp_path / "ours"), str(tmp_path / "hf")).eval()
    ids, feats = torch.randint(3, TINY.vocab_size, (2, 7)), torch.randn(2, TINY.feature_dim)
    with torch.no_grad():
        ref = meta_forward(
            reference_state(llama, adapter),
            ids,
            n_heads=TINY.n_heads,
            visual_query=meta_visual(adapter, feats),
            prefix=adapter["prefix_query.weight"],
            query_layer=TINY.query_layer,
        )
        assert (model(ids, feats).logits - ref).abs().max() < 1e-5


def test_bad_input_exits_4_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, adapter = official_weights(TINY)
    del adapter["llama.layers.1.attention.gate"]
    torch.save({"model": adapter}, tmp_path / "7B.pth")
    assert main(["convert", "adapter", str(tmp_path / "7B.pth"), str(tmp_path / "ours"), "--vocab-size", "96"]) == 4
    err = capsys.readouterr().err
    assert "7B.pth" in err and "llama.layers.1.attention.gate" in err
    assert not (tmp_path / "ours").exists()
    (tmp_path / "meta").mkdir()
    assert main(["convert", "llama", str(tmp_path / "meta"), str(tmp_path / "hf")]) == 4
    assert "params.json" in capsys.readouterr().err and not (tmp_path / "hf").exists()
