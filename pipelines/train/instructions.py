"""Stage 2 examples: instruction files read and checked, their images joined to features, text-only ones placeholded."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import fsspec
import numpy as np

from model.llm.chat import turn_prompt
from model.llm.prompts import format_prompt
from model.llm.tokenizer import TextTokenizer
from pipelines.config import Conversation
from pipelines.errors import InputError
from pipelines.train.data import Example
from pipelines.train.language import check_language
from stores.features import placeholder
from stores.instructions import (
    Instruction,
    InstructionFileError,
    image_key,
    join_features,
    read_instructions,
    require_features,
)
from stores.workspace import Workspace

log = logging.getLogger(__name__)


def instruction_examples(
    ws: Workspace,
    encoder_id: str,
    files: Sequence[str],
    feature_parts: Sequence[str],
    conversation: Conversation = "turns",
    tokenizer: TextTokenizer | None = None,
    tokenizer_name: str = "",
) -> list[Example]:
    """Every sample of `files` as an Example: one per (human, gpt) pair of a conversation (`turns`), the first pair
    only (`first`), or one per conversation with every answer scored (`whole`).

    Visual samples (LLaVA, cc_sbu_align) take the image feature whose url has the same base name as their image;
    text-only samples (Alpaca, GPT4LLM, GPT4Tools, ShareGPT) take the feature set's placeholder (the all-zero
    image's feature). With a `tokenizer`, Chinese files are checked against it (`language.check_language`).
    Raises InputError naming the file and the first offending record (with counts) for unreadable data, an unknown
    layout, images without a feature, a feature set without a placeholder, or Chinese text the tokenizer cannot hold.
    """
    examples: list[Example] = []
    fake: np.ndarray | None = None
    for path in files:
        try:
            data = read_instructions(
                path,
                first_turn_only=conversation == "first",
                whole=conversation == "whole",
                open_fn=lambda p: fsspec.open(p, "rb", **ws.options_for(p)).open(),
            )
        except FileNotFoundError:
            raise InputError(f"{path}: no such instruction file (train.stage2.data)") from None
        except InstructionFileError as e:
            raise InputError(str(e)) from None
        if tokenizer is not None:
            check_language(data, tokenizer, tokenizer_name)
        records = data.records
        visual = [r for r in records if r.image is not None]
        features: dict[int, np.ndarray] = {}
        if visual:
            if not feature_parts:
                raise InputError(
                    f"{path}: {len(visual)} samples need image features, and the feature set "
                    f"{encoder_id} has none; run `ibllm extract` on their images"
                )
            found, emb = join_features(
                [image_key(r.image) for r in visual], feature_parts, filesystem=None if ws.is_local else ws.fs
            )
            try:
                require_features(visual, found)
            except InstructionFileError as e:
                raise InputError(str(e)) from None
            features = {id(r): emb[i] for i, r in enumerate(visual)}
        if len(visual) < len(records) and fake is None:
            try:
                fake = placeholder(ws, encoder_id)
            except FileNotFoundError:
                raise InputError(
                    f"{path}: text-only samples need the placeholder feature of {encoder_id}, which "
                    "the feature set lacks; run `ibllm extract`"
                ) from None
        examples += [_example(r, features.get(id(r), fake)) for r in records]
        log.info(
            "%s: %s layout%s, %d samples (%d with an image)",
            path,
            data.layout,
            f" ({data.language})" if data.language else "",
            len(records),
            len(visual),
        )
    return examples


def _example(r: Instruction, feature: np.ndarray) -> Example:
    """A single-turn sample as today; a conversation with earlier turns as all its turns (the last one's prompt)."""
    if not r.history:
        return Example(feature, format_prompt(r.instruction, r.input), r.answer, f"{r.file}#{r.index}")
    turns = (*r.history, (r.instruction, r.answer))
    return Example(feature, turn_prompt(r.instruction, False), r.answer, f"{r.file}#{r.index}", turns)
