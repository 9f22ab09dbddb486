"""The demo's last word: `ibllm generate` on a held-out synthetic image (two turns of a conversation) and a synthetic
audio clip, with and without the visual cache."""

from __future__ import annotations

import os
import posixpath

from pydantic import BaseModel

from model.imagebind.encoder import encoder_id_for
from pipelines import assets
from pipelines.config import Config, with_settings
from pipelines.demo import text as demo_text
from pipelines.demo.synthetic import SyntheticSource
from pipelines.errors import InputError
from pipelines.runtime import loader
from pipelines.runtime.answerer import Reply
from pipelines.runtime.inputs import Request
from pipelines.train.data import is_heldout
from pipelines.train.setup import stage1_features
from stores.features import read_columns
from stores.workspace import Workspace

ASK_DIR = "demo"  # the held-out picture is written here, for anyone to look at


class Asked(BaseModel):
    """One question about one input."""

    input: str
    cache: bool
    question: str
    answer: str
    truth: str | None
    turn: int = 1


class DemoAnswers(BaseModel):
    """The demo's questions and the model's answers."""

    checkpoint: str
    asked: list[Asked]

    def summary(self) -> str:
        lines = [f"{'input':<28} {'cache':<6} {'turn':<5} answer"]
        for a in self.asked:
            truth = f"  (shows: {a.truth})" if a.truth else ""
            lines.append(
                f"{os.path.basename(a.input):<28} {'yes' if a.cache else 'no':<6} {a.turn:<5} "
                f"{a.question!r} -> {a.answer!r}{truth}"
            )
        return "\n".join(lines)


def run(cfg: Config, checkpoint: str) -> DemoAnswers:
    """Ask the colour question about the first held-out image and the caption question about the first audio clip."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    image, caption_shown = _heldout_image(cfg, ws)
    scene = demo_text.parse_caption(caption_shown)
    audio = ws.synthetic("media", "audio_00.wav")
    if not ws.exists(audio):
        raise InputError(f"{ws.as_url(audio)}: no synthetic audio clip; run `ibllm synthetic`")
    image, audio = (assets.local_copy(ws, ws.as_url(p)) for p in (image, audio))  # read as local files, as a user's
    (colour_q, _), (shape_q, _), caption_q = demo_text.QUESTIONS[0], demo_text.QUESTIONS[1], demo_text.QUESTIONS[-1][0]
    asked = []
    for cache in (False, True):  # one model (and encoder, cache) per setting; its questions decoded together
        settings = {"infer.checkpoint": checkpoint, "infer.use_cache": cache}
        answerer = loader.load(with_settings(cfg, settings), need_encoder=True, slots=2).answerer
        first = [
            Request(image=[image], prompt=colour_q, temperature=0.0),
            Request(audio=[audio], prompt=caption_q, temperature=0.0),
        ]
        colour, sound = (_text(a) for a in answerer.answer_all(first))
        follow = Request(image=[image], prompt=shape_q, temperature=0.0, history=[(colour_q, colour)])
        shape = answerer.answer(follow).text  # the second turn of the conversation about the image
        asked += [
            Asked(input=image, cache=cache, question=colour_q, answer=colour, truth=scene.color if scene else None),
            Asked(
                input=image, cache=cache, question=shape_q, answer=shape, truth=scene.shape if scene else None, turn=2
            ),
            Asked(input=audio, cache=cache, question=caption_q, answer=sound, truth=None),
        ]
    return DemoAnswers(checkpoint=checkpoint, asked=asked)


def _text(result: Reply | InputError) -> str:
    if isinstance(result, InputError):
        raise result
    return result.text


def _heldout_image(cfg: Config, ws: Workspace) -> tuple[str, str]:
    """The first held-out synthetic picture, rendered again from the source into a file, and its caption."""
    encoder_id = encoder_id_for(cfg.model.imagebind, cfg.model.imagebind_checkpoint, cfg.seed)
    items = SyntheticSource(cfg.synthetic).items
    for part in stage1_features(cfg, ws, encoder_id):
        cols = read_columns(ws, part, ["uid", "url", "caption"])
        for uid, url, caption in zip(cols["uid"], cols["url"], cols["caption"], strict=True):
            name = posixpath.basename(url.split("?")[0])
            stem = name.split(".")[0]
            if is_heldout(uid, cfg.train.holdout) and stem.isdigit() and int(stem) < len(items):
                path = ws.path(ASK_DIR, name)
                ws.write_bytes(path, items[int(stem)].render(cfg.synthetic.seed))
                return path, caption
    raise InputError("no held-out synthetic image: raise train.holdout")
