"""Tiny randomly initialised OWLv2 and Grounding DINO folders, saved as a released detector is (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizerFast,
    CLIPTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2Processor,
    SwinConfig,
)
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

WORDS = ["dog", "ball", "beach", "red", "brown", "circle", "square", "blue", "cat", "sofa"]
OWL_SIDE, OWL_PATCH = 32, 8  # a 4 x 4 grid of patches on the padded square


def clip_tokenizer(words: list[str] = WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each of `words` as one token (the rest falls into characters)."""
    vocab: dict[str, int] = {}
    for c in sorted(set("".join(words))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1  # last, as CLIP's (OWL masks 0)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def owlv2_folder(path: Path, seed: int = 0) -> Path:
    """A tiny OWLv2 detector with its processor, saved to `path` (safetensors). Its box head is zeroed, so each
    patch's box is the model's prior: a patch-sized box centred on the patch's bottom-right grid corner."""
    tokenizer = clip_tokenizer()
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Owlv2Config(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**small, "image_size": OWL_SIDE, "patch_size": OWL_PATCH},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # boxes = the patch grid (the box bias alone); scores = sigmoid of cosines, in [0.27, 0.73]
        for head in (model.box_head.dense2, model.class_head.logit_shift, model.class_head.logit_scale):
            head.weight.zero_()
            head.bias.zero_()
    model.save_pretrained(path)
    image_processor = Owlv2ImageProcessorPil(size={"height": OWL_SIDE, "width": OWL_SIDE})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def grounding_dino_folder(path: Path, seed: int = 0) -> Path:
    """A tiny Grounding DINO detector (Swin backbone, BERT text tower) with its processor, saved to `path`."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=2,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=12,
        max_text_len=32,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 256})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
