"""Stage 2 examples: instruction files read and checked, their images joined to features, text-only ones placeholded."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import fsspec
import numpy as np

from model.llm.prompts import format_prompt
from pipelines.errors import InputError
from pipelines.train.data import Example
from stores.features import placeholder
from stores.instructions import InstructionFileError, image_key, join_features, read_instructions, require_features
from stores.workspace import Workspace

log = logging.getLogger(__name__)


def instruction_examples(
    ws: Workspace, encoder_id: str, files: Sequence[str], feature_parts: Sequence[str], first_turn_only: bool = False
) -> list[Example]:
    """Every single-turn sample of `files` as an Example.

    Visual samples (LLaVA, cc_sbu_align) take the image feature whose url has the same base name as their image;
    text-only samples (Alpaca, GPT4LLM, ShareGPT) take the feature set's placeholder (the all-zero image's feature).
    Raises InputError naming the file and the first offending record (with counts) for unreadable data, an unknown
    layout, images without a feature, or a feature set without a placeholder.
    """
    examples: list[Example] = []
    fake: np.ndarray | None = None
    for path in files:
        try:
            data = read_instructions(
                path, first_turn_only=first_turn_only, open_fn=lambda p: fsspec.open(p, "rb").open()
            )
        except FileNotFoundError:
            raise InputError(f"{path}: no such instruction file (train.stage2.data)") from None
        except InstructionFileError as e:
            raise InputError(str(e)) from None
        records = data.records
        visual = [r for r in records if r.image is not None]
        features: dict[int, np.ndarray] = {}
        if visual:
            if not feature_parts:
                raise InputError(f"{path}: {len(visual)} samples need image features, and the feature set "
                                 f"{encoder_id} has none; run `ibllm extract` on their images")  # fmt: skip
            found, emb = join_features([image_key(r.image) for r in visual], feature_parts)
            try:
                require_features(visual, found)
            except InstructionFileError as e:
                raise InputError(str(e)) from None
            features = {id(r): emb[i] for i, r in enumerate(visual)}
        if len(visual) < len(records) and fake is None:
            try:
                fake = placeholder(ws, encoder_id)
            except FileNotFoundError:
                raise InputError(f"{path}: text-only samples need the placeholder feature of {encoder_id}, which "
                                 "the feature set lacks; run `ibllm extract`") from None  # fmt: skip
        for r in records:
            feature = features.get(id(r), fake)
            examples.append(Example(feature, format_prompt(r.instruction, r.input), r.answer, f"{r.file}#{r.index}"))
        log.info("%s: %s layout, %d samples (%d with an image)", path, data.layout, len(records), len(visual))
    return examples
