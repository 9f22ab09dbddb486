"""The demo's proof that the visual path works: the colour named in captions of held-out images, true vs shuffled."""

from __future__ import annotations

import logging
import re

import torch
from pydantic import BaseModel

from model.imagebind.encoder import encoder_id_for
from model.llm.chat import chat_prompt
from model.llm.engine import Engine, engine_texts
from model.llm.generate import Sampling
from model.llm.model import ImageBindLLM
from model.llm.prompts import CAPTION_INSTRUCTION, format_prompt
from model.llm.tokenizer import TextTokenizer
from pipelines.config import Config
from pipelines.demo import synthetic_media as media
from pipelines.demo import text as demo_text
from pipelines.errors import InputError
from pipelines.runtime import checkpoints
from pipelines.train.data import is_heldout
from pipelines.train.setup import stage1_features
from stores.features import read_pairs
from stores.runs import Runs
from stores.workspace import Workspace

log = logging.getLogger(__name__)
GREEDY = Sampling(temperature=0.0, max_new_tokens=24)
_COLOUR = re.compile(r"\b(" + "|".join(media.COLORS) + r")\b")
_SHAPE = re.compile(r"\b(" + "|".join(media.SHAPES) + r")\b")


class Said(BaseModel):
    """What the model said about one image, and what the image shows."""

    image: str
    truth: str
    text: str


class DemoCheck(BaseModel):
    """Held-out colour accuracy of stage 1's captions (true and shuffled features) and stage 2's answers."""

    heldout: int
    colour_accuracy: float
    shuffled_accuracy: float
    chance: float
    answer_accuracy: float
    question: str
    followup: str
    followup_accuracy: float  # the second turn: the shape named after the colour question and the model's answer
    followup_on_topic: float  # the second turn's answers that name a shape at all (the conversation was followed)
    captions: list[Said]
    answers: list[Said]

    def summary(self) -> str:
        lines = [
            f"held-out images: {self.heldout}; the shape's colour named in the caption: "
            f"{self.colour_accuracy:.0%} with the true features, {self.shuffled_accuracy:.0%} with shuffled ones "
            f"(chance {self.chance:.0%})",
            f"answers to {self.question!r}: {self.answer_accuracy:.0%} right",
            f"then, in the same conversation, {self.followup!r}: {self.followup_accuracy:.0%} right "
            f"(chance {1 / len(media.SHAPES):.0%}), {self.followup_on_topic:.0%} name a shape",
        ]
        lines += [f"  caption  {s.image}: {s.text!r} (shows {s.truth!r})" for s in self.captions]
        lines += [f"  answer   {s.image}: {s.text!r} (shows {s.truth!r})" for s in self.answers]
        return "\n".join(lines)


def named_shape(text: str) -> str | None:
    """The first shape word of a text."""
    m = _SHAPE.search(text)
    return m.group(1) if m else None


def named_colour(text: str) -> str | None:
    """The first colour word of a text (backgrounds are greys, so in a caption it is the shape's)."""
    m = _COLOUR.search(text)
    return m.group(1) if m else None


def run(
    cfg: Config, stage1: str | None = None, stage2: str | None = None, batch_size: int = 64, examples: int = 3
) -> DemoCheck:
    """Caption every held-out image with the stage-1 model and ask the stage-2 model the colour question."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    stage1 = stage1 or Runs.of_stage(ws, 1).newest_complete()
    stage2 = stage2 or Runs.of_stage(ws, 2).newest_complete()
    if stage1 is None or stage2 is None:
        raise InputError("the demo check needs a complete stage-1 and stage-2 run: run `ibllm train` first")
    m = cfg.model
    images, truths, features = [], [], []
    for part in stage1_features(cfg, ws, encoder_id_for(m.imagebind, m.imagebind_checkpoint, cfg.seed)):
        uids, captions, emb = read_pairs(ws, part)
        for i, (uid, caption) in enumerate(zip(uids, captions, strict=True)):
            scene = demo_text.parse_caption(caption)
            if scene is not None and is_heldout(uid, cfg.train.holdout):
                images.append(uid), truths.append(scene), features.append(torch.from_numpy(emb[i]))
    if len(images) < 2:
        raise InputError(f"{len(images)} held-out synthetic images: raise train.holdout ({cfg.train.holdout})")
    feats = torch.stack(features)
    captioner, tokenizer = checkpoints.load(cfg, ws, checkpoints.inspect(cfg, ws, stage1))
    captioner.eval()
    caption_prompt = format_prompt(CAPTION_INSTRUCTION)
    true_caps = _say(captioner, tokenizer, caption_prompt, feats, batch_size)
    shuffled_caps = _say(captioner, tokenizer, caption_prompt, feats.roll(1, dims=0), batch_size)
    del captioner
    question = demo_text.QUESTIONS[0][0]
    answerer, _ = checkpoints.load(cfg, ws, checkpoints.inspect(cfg, ws, stage2))
    answerer.eval()
    answers = _say(answerer, tokenizer, format_prompt(question), feats, batch_size)
    followup = demo_text.QUESTIONS[1][0]
    second = _follow_up(answerer, tokenizer, question, answers, followup, feats, batch_size)
    colours = [s.color for s in truths]
    shown = min(examples, len(images))
    result = DemoCheck(
        heldout=len(images),
        colour_accuracy=_accuracy(true_caps, colours),
        shuffled_accuracy=_accuracy(shuffled_caps, colours),
        chance=1 / len(media.COLORS),
        answer_accuracy=_accuracy(answers, colours),
        question=question,
        followup=followup,
        followup_accuracy=sum(named_shape(t) == s.shape for t, s in zip(second, truths, strict=True)) / len(truths),
        followup_on_topic=sum(named_shape(t) is not None for t in second) / len(second),
        captions=[Said(image=images[i], truth=truths[i].caption, text=true_caps[i]) for i in range(shown)],
        answers=[Said(image=images[i], truth=truths[i].color, text=answers[i]) for i in range(shown)],
    )
    log.info(
        "demo check: colour accuracy %.3f (shuffled %.3f) over %d held-out images",
        result.colour_accuracy,
        result.shuffled_accuracy,
        result.heldout,
    )
    return result


@torch.no_grad()
def _say(model: ImageBindLLM, tokenizer: TextTokenizer, prompt: str, feats: torch.Tensor, batch: int) -> list[str]:
    """Greedy answers to `prompt` about each feature, decoded `batch` at a time by the generation engine."""
    engine = Engine(model, slots=min(batch, len(feats)))
    return engine_texts(engine, tokenizer, [prompt] * len(feats), model.visual_query(feats), GREEDY)


@torch.no_grad()
def _follow_up(
    model: ImageBindLLM,
    tokenizer: TextTokenizer,
    question: str,
    answers: list[str],
    followup: str,
    feats: torch.Tensor,
    batch: int,
) -> list[str]:
    """Greedy answers to `followup` as the second turn of each image's conversation (its first answer kept)."""
    engine = Engine(model, slots=min(batch, len(feats)))
    visual = model.visual_query(feats)
    requests = [
        {
            "prompt": chat_prompt(tokenizer, [(question, a)], followup),
            "visual": visual[i],
            "sampling": GREEDY,
            "eos_id": tokenizer.eos_id,
        }
        for i, a in enumerate(answers)
    ]
    return [tokenizer.decode(ids).strip() for ids in engine.generate(requests)]


def _accuracy(texts: list[str], colours: list[str]) -> float:
    return sum(named_colour(t) == c for t, c in zip(texts, colours, strict=True)) / len(colours)
