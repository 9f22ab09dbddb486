"""`ibllm chat`: a conversation in the terminal about images, audio, video and 3D, the answers streamed as they come."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from pydantic import BaseModel

from pipelines import stop
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.runtime import loader
from pipelines.runtime.answerer import Answerer
from pipelines.runtime.inputs import FILE_MODALITIES, Request, check_files

HELP = """commands:
  /image PATH, /audio PATH, /video PATH   add an input the conversation is about (several are mixed)
  /point PATH                             add a 3D point cloud (.npy .pt .ply .pcd .xyz .pts .obj)
  /reset                                  forget the conversation and its inputs
  /help                                   this text
  /quit                                   leave (so does end of input)
anything else is a question"""


class ChatResult(BaseModel):
    """What was said: the conversation's turns in order (the last conversation, after any /reset)."""

    turns: list[tuple[str, str]]
    inputs: dict[str, list[str]]

    def summary(self) -> str:
        """Nothing: the conversation was on the terminal already (`--json` prints the turns)."""
        return ""


@dataclass
class Chat:
    """One conversation: its inputs (the visual query of the whole dialogue) and its finished turns."""

    answerer: Answerer
    defaults: Request = field(default_factory=Request)
    inputs: dict[str, list[str]] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)

    def add_input(self, modality: str, path: str) -> str:
        """Take an input file for the rest of the conversation (checked now); returns what to tell the user."""
        path = os.path.expanduser(path.strip())
        if not path:
            raise InputError(f"/{modality} needs a file: /{modality} PATH")
        check_files(Request(**{modality: [path]}))
        self.inputs.setdefault(modality, []).append(path)
        return f"[{modality} {path} added; the conversation is about {self._about()}]"

    def reset(self) -> str:
        self.inputs, self.history = {}, []
        return "[conversation and inputs forgotten]"

    def ask(self, question: str, out: TextIO | None = None) -> str:
        """The answer to `question` after the conversation so far (streamed into `out` as it is decoded)."""
        request = self.defaults.model_copy(update={"prompt": question, "history": list(self.history), **self.inputs})
        shown = [0]

        def stream(_: int, text: str) -> None:
            stop.check()  # Ctrl-C cancels this answer (run() goes back to the prompt)
            if out is not None and len(text) > shown[0]:
                out.write(text[shown[0] :].lstrip() if shown[0] == 0 else text[shown[0] :])
                out.flush()
                shown[0] = len(text)

        answer = self.answerer.answer(request, stream).text
        if out is not None:
            out.write("\n")
            out.flush()
        self.history.append((question, answer))
        return answer

    def _about(self) -> str:
        return ", ".join(f"{len(v)} {m}" for m, v in self.inputs.items()) or "nothing (text only)"


def start(cfg: Config, inputs: dict[str, list[str]], seed: int | None = None) -> Chat:
    """A conversation with the model of `infer.*` about `inputs` (modality -> paths; the encoder is loaded now when
    there are any, else on the first), sampling with `seed` (default: the config's)."""
    loaded = loader.load(cfg, need_encoder=any(inputs.values()), slots=1)
    chat = Chat(loaded.answerer, Request(seed=cfg.seed if seed is None else seed))
    for modality, paths in inputs.items():
        for path in paths:
            chat.add_input(modality, path)
    return chat


def run(chat: Chat, lines: Iterable[str], out: TextIO, prompt: str = "you> ") -> ChatResult:
    """Read questions and commands from `lines`, write the answers to `out`; errors are shown, not fatal."""
    out.write(f"[chatting; /help lists the commands; inputs: {chat._about()}]\n{prompt}")
    out.flush()
    given = iter(lines)
    while True:
        with stop.at_once():  # Ctrl-C at the prompt ends the chat; while an answer streams it cancels the answer
            raw = next(given, None)
        if raw is None:
            break
        line = raw.strip()
        try:
            if not line:
                pass
            elif line in ("/quit", "/exit"):
                break
            elif line == "/help":
                out.write(HELP + "\n")
            elif line == "/reset":
                out.write(chat.reset() + "\n")
            elif line.startswith("/"):
                command, _, argument = line[1:].partition(" ")
                if command not in FILE_MODALITIES:
                    raise InputError(f"unknown command /{command}; /help lists them")
                out.write(chat.add_input(command, argument) + "\n")
            else:
                out.write("ibllm> ")
                chat.ask(line, out)
        except InputError as e:
            out.write(f"[error: {e}]\n")
        except stop.Stopped:  # Ctrl-C while an answer streamed: that answer is dropped, the chat goes on
            stop.clear()
            out.write("\n[answer cancelled]\n")
        out.write(prompt)
        out.flush()
    out.write("\n")
    out.flush()
    return ChatResult(turns=chat.history, inputs=chat.inputs)
