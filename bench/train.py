"""Benchmark: stage-1 training on CPU: loader vs model rate, cached features vs the encoder in the loop, padding.

Usage: python -m bench.train [--quick] [--threads N] [--batch 64] [--presets tiny base] [--encoder-batch 16]
1. The input pipeline alone (Parquet parts -> seeded shuffle -> tokenise -> collate: pipelines.train.data) over one
   epoch, in samples/s, against the tiny model's stage-1 step (forward, backward, AdamW) on the same batches.
2. The same LLM step fed cached features vs fed by ImageBind in the loop, as the reference trains: decode the JPEG
   bytes, preprocess, frozen encoder forward under no_grad, then the step; per ImageBind preset, same batch.
3. Real (prompt + answer) tokens per second of the step when padding to the batch's longest vs to max_words.
Captions have CC3M-like lengths (mean ~11 words). Compare the ratios, measured within one run; absolute times are noisy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from model.imagebind.encoder import ImageBind
from model.llm.config import LLMConfig
from model.llm.model import ImageBindLLM
from model.llm.phases import decay_groups, set_phase
from model.llm.prompts import CAPTION_INSTRUCTION, collate, encode_example, format_prompt
from model.llm.tokenizer import BPETokenizer, train_bpe_tokenizer
from pipelines.demo.synthetic_media import BACKGROUNDS, COLORS, SHAPES, draw_shape, encode_image
from pipelines.train.data import FeatureCaptions, Micro, Plan, step_batches
from stores import features
from stores.workspace import Workspace

DIM = 1024
PROMPT = format_prompt(CAPTION_INSTRUCTION)
WORDS = [
    "a",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "man",
    "woman",
    "dog",
    "cat",
    "car",
    "street",
    "city",
    "beach",
    "red",
    "blue",
    "green",
    "old",
    "young",
    "small",
    "large",
    "house",
    "tree",
    "sky",
    "water",
    "people",
    "walking",
    "sitting",
    "standing",
    "holding",
    "near",
    "front",
    "background",
    "view",
    "night",
    "sunset",
    "portrait",
    "illustration",
    "vector",
    "isolated",
    "white",
    "black",
    "beautiful",
    "road",
    "field",
]


def make_captions(n: int, rng: np.random.Generator) -> list[str]:
    """CC3M-like captions: 3 + Poisson(8) words (mean ~11, a long tail within a batch)."""
    return [" ".join(rng.choice(WORDS, 3 + rng.poisson(8))) for _ in range(n)]


def write_parts(root: str, captions: Sequence[str], parts: int, rng: np.random.Generator) -> list[str]:
    """Feature Parquet parts as extraction writes them (random unit image/text embeddings)."""
    paths = []
    for p, idx in enumerate(np.array_split(np.arange(len(captions)), parts)):
        emb = rng.standard_normal((len(idx), DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        path = os.path.join(root, f"part-{p:05d}.parquet")
        features.write_features(
            path,
            {
                "uid": [f"u{i}" for i in idx],
                "source": ["bench"] * len(idx),
                "caption": [captions[i] for i in idx],
                "url": [""] * len(idx),
                "image_emb": emb,
                "text_emb": emb,
                "clip_score": np.zeros(len(idx)),
                "encoder_id": ["bench"] * len(idx),
            },
            DIM,
        )
        paths.append(path)
    return paths


def make_model(vocab: int) -> tuple[ImageBindLLM, torch.optim.Optimizer]:
    """The tiny ImageBind-LLM in its stage-1 phase and the AdamW of pipelines.train.schedule."""
    torch.manual_seed(0)
    model = ImageBindLLM(LLMConfig.preset("tiny", vocab_size=vocab))
    trainable = set_phase(model, "pretrain")
    return model, torch.optim.AdamW(decay_groups(trainable, 0.05), lr=1e-4, betas=(0.9, 0.95))


def train_step(
    model: ImageBindLLM, opt: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor
) -> None:
    model(ids, feats, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def paired_s(
    a: Callable[[int], object], b: Callable[[int], object], steps: int, warmup: int, seconds: float
) -> tuple[float, float]:
    """Fastest seconds of a(i) and of b(i): at least `steps` timed calls each and `seconds` in all, after `warmup`.

    The two are called in turn, so that both see the same load; the fastest call, as other work on a shared
    machine only ever adds time (the median of a few base-encoder calls was not stable under load).
    """
    times: tuple[list[float], list[float]] = ([], [])
    i, end = 0, float("inf")
    while i < warmup + steps or time.perf_counter() < end:
        if i == warmup:
            end = time.perf_counter() + seconds
        for fn, out in zip((a, b), times, strict=True):
            start = time.perf_counter()
            fn(i)
            if i >= warmup:
                out.append(time.perf_counter() - start)
        i += 1
    return min(times[0]), min(times[1])


def loader_vs_model(
    files: list[str],
    n: int,
    tok: BPETokenizer,
    batch: int,
    max_words: int,
    model: ImageBindLLM,
    opt: torch.optim.Optimizer,
    warmup: int = 2,
) -> tuple[float, float, list[Micro]]:
    """Samples/s of the loader and of the model step, taking turns over one epoch; and the epoch's batches.

    The loader's rate counts all its time: reading the parts, shuffling, tokenising, collating. The model's is its
    fastest step after `warmup` (other work on the machine slows it most): both err towards a lower ratio.
    """
    source = FeatureCaptions(Workspace(os.path.dirname(files[0])), files, seed=0, buffer=10_000, size=n)
    plan = Plan(batch, 1, 1, max_words)
    stream = step_batches(source, tok, plan, rank=0, start_step=0, pad_id=0)
    load_s, model_s, micros = 0.0, float("inf"), []
    for i in range(plan.steps_per_epoch(n)):
        start = time.perf_counter()
        micros.append(m := next(stream)[0])
        mid = time.perf_counter()
        train_step(model, opt, m.input_ids, m.labels, m.features)
        load_s += mid - start
        model_s = min(model_s, time.perf_counter() - mid) if i >= warmup else model_s
    return len(micros) * batch / load_s, batch / model_s, micros


def jpegs(n: int) -> list[bytes]:
    """Photo-sized (384 x 288) JPEGs of drawn shapes with sensor noise."""
    colours, backs = sorted(COLORS), sorted(BACKGROUNDS)
    return [
        encode_image(
            draw_shape((384, 288), SHAPES[i % len(SHAPES)], colours[i % len(colours)], backs[i % len(backs)], 0.5, i),
            "jpg",
        )
        for i in range(n)
    ]


def encoder_steps(
    preset: str, model: ImageBindLLM, opt: torch.optim.Optimizer, micro: Micro, steps: int, seconds: float
) -> tuple[float, float]:
    """Seconds per stage-1 step with cached features and with decode + preprocess + ImageBind in the loop."""
    encoder = ImageBind.load(preset, seed=0, device="cpu", dtype="float32")
    images = jpegs(len(micro.input_ids))

    def in_loop(_: int) -> None:
        with torch.no_grad():
            feats = encoder.embed_images(images, batch_size=len(images))
        train_step(model, opt, micro.input_ids, micro.labels, feats)

    def cached(_: int) -> None:
        train_step(model, opt, micro.input_ids, micro.labels, micro.features)

    return paired_s(cached, in_loop, steps, 1, seconds)


def padding(
    model: ImageBindLLM,
    opt: torch.optim.Optimizer,
    tok: BPETokenizer,
    captions: Sequence[str],
    max_words: int,
    batch: int,
    steps: int,
    seconds: float,
) -> tuple[float, float, int, float]:
    """Real tokens/s padding one batch to its longest and to max_words, its padded length and mean real length."""
    examples = [encode_example(tok, PROMPT, c, max_words) for c in captions[:batch]]
    feats = torch.nn.functional.normalize(torch.randn(batch, DIM), dim=-1)
    real = sum(len(t) for t, _ in examples)
    (ids, labels), (padded_ids, padded_labels) = (collate(examples, 0, pad_to) for pad_to in (None, max_words))
    secs = paired_s(
        lambda _: train_step(model, opt, ids, labels, feats),
        lambda _: train_step(model, opt, padded_ids, padded_labels, feats),
        steps,
        2,
        seconds,
    )
    return real / secs[0], real / secs[1], ids.shape[1], real / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data, fewer steps, tiny ImageBind only (~1 min)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--rows", type=int, default=8192, help="feature rows of the loader's data set")
    p.add_argument("--batch", type=int, default=64, help="samples a step (loader, model, padding)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each padding at least (after 2 warm-up)")
    p.add_argument("--seconds", type=float, default=6.0, help="time each A/B comparison runs at least")
    p.add_argument("--presets", nargs="+", default=["tiny", "base"], help="ImageBind presets for the encoder loop")
    p.add_argument("--encoder-batch", type=int, default=16, help="samples a step with the encoder in the loop")
    p.add_argument("--encoder-steps", type=int, default=3, help="timed steps of each at least (after 1)")
    p.add_argument("--max-words", type=int, nargs="+", default=[96, 512], help="stage 1's, then stage 2's")
    args = p.parse_args()
    if args.quick:
        args.rows, args.steps, args.seconds, args.presets = min(args.rows, 2048), min(args.steps, 5), 2.0, ["tiny"]
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    captions = make_captions(args.rows, rng)
    tok = train_bpe_tokenizer([PROMPT] * 4 + captions[:2000], vocab_size=1000)
    model, opt = make_model(tok.n_words)
    print(
        f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), {args.threads} torch threads; tiny LLM "
        f"(vocab {tok.n_words}), stage 1, batch {args.batch}, {args.rows} feature rows"
    )
    table: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as root:
        files = write_parts(root, captions, 8, rng)
        load_rate, model_rate, micros = loader_vs_model(
            files, args.rows, tok, args.batch, args.max_words[0], model, opt
        )
    ratio = load_rate / model_rate
    print(
        f"loader {load_rate:,.0f} samples/s (one epoch, tokenising included); model step {model_rate:,.0f} "
        f"samples/s (fastest step of {args.batch}: {args.batch / model_rate * 1e3:.1f} ms); loader/model {ratio:.1f}x"
    )
    table.append(("loader / model samples/s (target >= 5)", f"{ratio:.1f}x"))
    micro = micros[0]
    if args.encoder_batch < len(micro.input_ids):
        keep = slice(0, args.encoder_batch)
        micro = Micro(micro.input_ids[keep], micro.labels[keep], micro.features[keep])
    for preset in args.presets:
        cached, in_loop = encoder_steps(preset, model, opt, micro, args.encoder_steps, args.seconds)
        print(
            f"ImageBind {preset}, batch {len(micro.input_ids)}: cached features {cached * 1e3:.1f} ms a step, "
            f"encoder in the loop {in_loop * 1e3:.1f} ms; {in_loop / cached:.1f}x slower"
        )
        table.append((f"encoder in loop / cached, ImageBind {preset}", f"{in_loop / cached:.1f}x"))
    for max_words in args.max_words:
        longest, padded, length, mean = padding(
            model, opt, tok, captions, max_words, args.batch, args.steps, args.seconds
        )
        print(
            f"max_words {max_words}: pad to longest ({length}) {longest:,.0f} real tokens/s, pad to {max_words} "
            f"{padded:,.0f}; {longest / padded:.1f}x (mean real length {mean:.0f})"
        )
        table.append((f"tokens/s pad to longest / pad to {max_words}", f"{longest / padded:.1f}x"))
    width = max(len(k) for k, _ in table)
    print("\n" + "\n".join(f"{k:<{width}}  {v:>7}" for k, v in table))
    print(f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; this run alone adds ~1-2)")


if __name__ == "__main__":
    main()
