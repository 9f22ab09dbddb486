"""Model assets (base LLaMA, tokenizer, CLIP vocabulary, stage-2 data): the configured value, else the demo's
artifact in the workspace. One rule, in one place, for every stage; the demo writes its artifacts where it says."""

from __future__ import annotations

import os
import posixpath
import tempfile

import fsspec

from pipelines.config import Config, ConfigError
from pipelines.errors import InputError
from pipelines.paths import is_url
from stores.workspace import Workspace

DEMO_BASE = ("checkpoints", "stage0", "base")  # stage 0's base LLaMA (llama/) and tokenizer (tokenizer.json)
DEMO_VOCAB = ("models", "clip_bpe_demo.txt.gz")  # the CLIP vocabulary the demo learns for small presets
DEMO_INSTRUCTIONS = ("instructions", "synthetic.json")  # the demo's generated stage-2 conversations
NO_TOKENIZER = "model.tokenizer_path is not set (LLaMA's tokenizer.model, or a tokenizer.json)"


_LOCAL_COPIES: dict[str, str] = {}


def _demo(ws: Workspace, *parts: str) -> str | None:
    """A demo artifact in the workspace: its path (a URL on object storage), None when it is not there."""
    path = ws.path(*parts)
    return ws.as_url(path) if ws.exists(path) else None


def local_copy(ws: Workspace, location: str) -> str:
    """A local path for a file or folder that libraries read from disk (transformers, tokenizers, our checkpoints):
    the path itself when local; a URL (the demo's base LLaMA, a checkpoint in an S3 workspace) is copied once per
    process, in the driver or a Ray worker on any node, with the workspace's options when on its storage. What it
    copies never changes under the same URL (committed checkpoints, the stage-0 base under its record)."""
    if not is_url(location) or location.startswith("file://"):
        return location.removeprefix("file://")
    if location not in _LOCAL_COPIES:
        fs, path = fsspec.core.url_to_fs(location, **ws.options_for(location))
        target = os.path.join(tempfile.mkdtemp(prefix="ibllm-asset-"), posixpath.basename(path.rstrip("/")))
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", target + "/", recursive=True)
        else:
            fs.get(path, target)
        _LOCAL_COPIES[location] = target
    return _LOCAL_COPIES[location]


def base_llama(cfg: Config, ws: Workspace, recorded: str | None = None) -> str | None:
    """The base LLaMA folder: `model.llama_path`, else the demo's stage-0 model, else what a run recorded (None: the
    seeded random tiny LLaMA, for tests)."""
    return cfg.model.llama_path or _demo(ws, *DEMO_BASE, "llama") or recorded


def tokenizer(cfg: Config, ws: Workspace, recorded: str | None = None) -> str:
    """The LLaMA tokenizer: `model.tokenizer_path`, else the demo's, else what a run recorded; InputError if none."""
    found = cfg.model.tokenizer_path or _demo(ws, *DEMO_BASE, "tokenizer.json") or recorded
    if not found:
        raise InputError(NO_TOKENIZER)
    return found


def clip_vocab_file(cfg: Config, ws: Workspace) -> str | None:
    """ImageBind's CLIP vocabulary as a local file: `model.imagebind_vocab` (fetched when an URL), else the demo's
    learned one for small presets, else None (the encoder then takes no text)."""
    vocab = cfg.model.imagebind_vocab
    if vocab and "://" in vocab and not vocab.startswith("file://"):
        local = os.path.join(tempfile.mkdtemp(prefix="ibllm-vocab-"), posixpath.basename(vocab))
        with fsspec.open(vocab, "rb", **cfg.storage_options) as src, open(local, "wb") as dst:
            dst.write(src.read())
        return local
    if vocab:
        vocab = vocab.removeprefix("file://")
        if not os.path.isfile(vocab):
            raise InputError(f"model.imagebind_vocab not found: {vocab}")
        return vocab
    demo = _demo(ws, *DEMO_VOCAB) if cfg.model.imagebind != "huge" else None
    return local_copy(ws, demo) if demo else None


def clip_vocab_bytes(cfg: Config, ws: Workspace) -> bytes:
    """The CLIP vocabulary's bytes (extraction ships them to its workers); a clear error when there is none."""
    if cfg.model.imagebind_vocab:
        with fsspec.open(cfg.model.imagebind_vocab, "rb", **cfg.storage_options) as f:
            return f.read()
    if cfg.model.imagebind == "huge":
        raise ConfigError("model.imagebind_vocab is required with the huge encoder (bpe_simple_vocab_16e6.txt.gz)")
    path = ws.path(*DEMO_VOCAB)
    if not ws.exists(path):
        raise InputError(
            f"model.imagebind_vocab is not set and the demo's vocabulary {ws.as_url(path)} is not "
            "there: set model.imagebind_vocab (on the demo, `ibllm extract` learns one)"
        )
    return ws.read_bytes(path)


def stage2_data(cfg: Config, ws: Workspace) -> list[str]:
    """Stage 2's instruction files: `train.stage2.data`, else the demo's generated conversations when written."""
    if cfg.train.stage2.data:
        return list(cfg.train.stage2.data)
    path = ws.path(*DEMO_INSTRUCTIONS)
    return [ws.as_url(path)] if ws.exists(path) else []
