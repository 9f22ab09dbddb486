"""The command line's options as data: each flag, its help, and the config setting it stands for."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from pipelines.config import Config
from pipelines.config.names import BENCHMARKS


@dataclass(frozen=True)
class Flag:
    """One option (or positional argument) of a command.

    Attributes:
        names: what is typed: `("--top-p",)`, `("-k",)`, or a positional's name.
        help: what it does; a flag with a `setting` and no help takes the setting's description.
        setting: the config field the flag stands for (`infer.top_p`): sugar for `--set infer.top_p=...`, its
            default named in the help from the config, so that each default lives in one place.
        kwargs: argparse's own keywords (type, action, choices, metavar, default, dest, nargs, required).
    """

    names: tuple[str, ...]
    help: str = ""
    setting: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        """The attribute argparse stores it under."""
        return self.kwargs.get("dest") or self.names[-1].lstrip("-").replace("-", "_")


def flag(*names: str, help: str = "", setting: str | None = None, **kwargs: Any) -> Flag:
    """A Flag; a flag with a `setting` defaults to None (not given: the config decides)."""
    if setting is not None:
        kwargs.setdefault("default", None)
    return Flag(names, help, setting, kwargs)


def field_of(dotted: str) -> Any:
    """The pydantic field of a dotted config setting (`infer.top_p`)."""
    model: type[BaseModel] = Config
    *sections, name = dotted.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]
    return model.model_fields[name]


def help_of(f: Flag) -> str:
    """The flag's help, with the setting it stands for and that setting's default."""
    if f.setting is None:
        return f.help
    spec = field_of(f.setting)
    default = spec.get_default(call_default_factory=True)
    shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
    return f"{f.help or spec.description} ({f.setting}; default {shown})"


def add(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    """Add each flag to `parser`."""
    for f in flags:
        parser.add_argument(*f.names, help=help_of(f), **f.kwargs)


def settings_given(flags: list[Flag], args: argparse.Namespace) -> dict[str, Any]:
    """{setting: value} of the flags given on the command line (in the order of the table)."""
    out = {}
    for f in flags:
        value = getattr(args, f.dest, None)
        if f.setting is not None and value is not None:
            out[f.setting] = value
    return out


POINT_FILES = "a 3D point-cloud file: .npy, .pt, .ply, .pcd, .xyz, .pts or .obj"

COMMON = [
    flag(
        "-c",
        "--config",
        action="append",
        help="YAML config or a packaged one's name (default: the packaged configs/demo.yaml); repeat it to lay "
        "files one over the next, e.g. -c demo -c mine.yaml",
    ),
    flag(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set download.timeout=5 (repeatable; values are YAML)",
    ),
    flag("--workspace", setting="workspace", help="workspace root: a folder or an fsspec URL such as s3://bucket/run"),
    flag("--json", action="store_true", help="print the result as one JSON document on stdout"),
    flag("--force", action="store_true", help="discard outputs made with other settings and redo"),
    flag("--debug", action="store_true", help="show the traceback of an unexpected error"),
    flag(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and everything Ray, img2dataset, autofaiss and Prefect print",
    ),
]
DEVICE = [
    flag("--device", setting="infer.device"),
    flag("--dtype", setting="infer.dtype", choices=["auto", "float32", "bfloat16", "float16"]),
]
MODEL = [
    flag("--checkpoint", setting="infer.checkpoint"),
    flag("--cache", setting="infer.use_cache", action="store_true"),
    *DEVICE,
]
SAMPLING = [
    flag("--temperature", setting="infer.temperature", type=float),
    flag("--top-p", setting="infer.top_p", type=float),
    flag("--max-new-tokens", setting="infer.max_new_tokens", type=int),
]
POINTS = [
    flag("--normalize-points", setting="model.point_normalize", action="store_true"),
    flag("--resample-points", setting="model.point_resample", type=int, metavar="N"),
]


def files(about: str, text: str | None = None) -> list[Flag]:
    """The repeatable input files of each modality (and texts for ImageBind's text tower when `text` says what they
    are), each help ending with `about`, and the point-cloud options."""
    kinds = {"image": "an image file", "audio": "an audio file", "video": "a video file"}
    kinds |= {"text": text} if text else {}
    out = [
        flag(f"--{m}", action="append", default=[], metavar="STRING" if m == "text" else "PATH", help=f"{what} {about}")
        for m, what in kinds.items()
    ]
    point = flag(
        "--point-cloud", dest="point", action="append", default=[], metavar="PATH", help=f"{POINT_FILES} {about}"
    )
    return [*out, point, *POINTS]


def inputs(text: str = "a text for ImageBind's text tower") -> list[Flag]:
    """The inputs of generate and imagine: files of each modality, texts for the text tower, their weights."""
    weight = flag(
        "--weight",
        action="append",
        default=[],
        metavar="MODALITY=W",
        help="weight of a modality in the mix, e.g. --weight audio=0.5 (default 1 each)",
    )
    return [*files("(repeatable; several are averaged)", text), weight]


def requests(fields: str) -> Flag:
    """--requests of generate and imagine: a JSONL of requests whose fields override the options."""
    return flag(
        "--requests",
        metavar="FILE.jsonl",
        help=f"one JSON request per line: image/audio/video/point/text, weights, prompt, {fields} (the options above "
        "are the defaults)",
    )


GENERATE = [
    *inputs("a text for ImageBind's text tower (not the prompt)"),
    flag("--prompt", help="the instruction (default with inputs: 'Generate caption of this image')"),
    *MODEL,
    *SAMPLING,
    flag("--seed", type=int, help="sampling seed (default: the config's seed)"),
    requests("temperature, top_p, max_new_tokens, seed"),
    flag("--output", metavar="FILE.jsonl", help="write one JSON line per request there (default: stdout)"),
    flag(
        "--history",
        metavar="FILE.json",
        help="the conversation so far: OpenAI messages, ShareGPT turns or "
        "[[question, answer], ...]; the prompt is its next question",
    ),
    flag("--batch", setting="infer.batch", type=int),
    flag(
        "--ground",
        action="store_true",
        help="find the answer's noun phrases in the input image with the "
        "detector of model.detector (OWLv2, Grounding DINO): boxes in the result",
    ),
    flag("--ground-threshold", type=float, metavar="T", help="lowest box score kept (default 0.1)"),
    flag("--ground-out", metavar="FILE.png", help="draw the boxes on the image there (a batch's line N: FILE-N.png)"),
]
CHAT = [
    *files("the conversation starts about (repeatable)"),
    *MODEL,
    *SAMPLING,
    flag("--seed", type=int, help="sampling seed (default: the config's seed)"),
]
IMAGINE = [
    *inputs(),
    flag("--prompt", help="a text prompt for unCLIP's own text encoder beside the embedding (default none)"),
    flag("--cache", setting="infer.use_cache", action="store_true"),
    flag(
        "--out",
        dest="picture",
        default="imagined.png",
        metavar="FILE.png",
        help="the PNG (several: FILE-0.png, FILE-1.png, ...; --requests: FILE-LINE-0.png, ...)",
    ),
    flag("--generator", setting="imagine.generator", metavar="DIR"),
    flag("--seed", type=int, help="noise seed; image i of a request uses seed + i (default: the config's)"),
    flag("--steps", setting="imagine.steps", type=int),
    flag("--guidance", setting="imagine.guidance", type=float),
    flag("--noise-level", setting="imagine.noise_level", type=int),
    flag("--size", setting="imagine.size", type=int),
    flag("--num-images", setting="imagine.images", type=int),
    requests("seed"),
    flag("--batch", setting="imagine.batch", type=int),
    *DEVICE,
]
EVALUATE = [
    flag("--stage", type=int, choices=[1, 2], default=1, help="newest complete run of this stage"),
    flag("--checkpoint", setting="infer.checkpoint"),
    flag(
        "--benchmark",
        choices=BENCHMARKS,
        help="mme (MME's released folder), vqa (a JSONL of questions), "
        "captions (a COCO captions file), zeroshot-image|audio|point (ImageNet, ESC-50, ModelNet40 layouts): "
        "instead of the held-out loss",
    ),
    flag("--data", metavar="PATH", help="the benchmark's folder or file"),
    flag("--images", metavar="DIR", help="captions: the images' folder (default: the file's folder)"),
    flag("--subtasks", metavar="A,B", help="mme: only these subtasks (e.g. existence,color)"),
    flag("--limit", type=int, help="only the first N questions (zero-shot: N samples, seeded shuffle)"),
    flag("--cache", setting="infer.use_cache", action="store_true"),
    flag("--batch", setting="infer.batch", type=int),
    *DEVICE,
]
SERVE = [
    flag("--host", setting="serve.host"),
    flag("--port", setting="serve.port", type=int),
    *MODEL,
    flag("--ray", action="store_true", help="as a Ray Serve deployment (on ray.address, else local)"),
    flag("--replicas", setting="serve.replicas", type=int),
]
CONVERT = [
    flag(
        "kind",
        choices=["llama", "adapter", "export"],
        help="llama: Meta folder -> transformers folder; adapter: "
        "7B.pth -> our checkpoint; export: our checkpoint -> official .pth",
    ),
    flag("source", help="input: Meta folder, adapter .pth, or our checkpoint folder"),
    flag("output", help="output folder (llama, adapter) or .pth file (export)"),
    flag("--dtype", choices=["float32", "float16", "bfloat16"], help="llama: cast the weights"),
    flag(
        "--vocab-size",
        type=int,
        help="LLaMA's vocabulary: llama, when params.json says -1 (default: the "
        "embedding's rows); adapter (default: what `convert export` recorded in the file, else 32000)",
    ),
    flag("--overwrite", action="store_true", help="replace an existing output (folder or file)"),
]

# Each command's own options, beside COMMON.
OPTIONS: dict[str, list[Flag]] = {
    "synthetic": [flag("--serve", action="store_true", help="keep serving until interrupted")],
    "download": [
        flag(
            "--retry-failed",
            action="store_true",
            help="download again, into new shards, only the samples that failed for a retryable reason",
        )
    ],
    "index": [
        flag("--query-image", metavar="PATH", help="an image whose nearest cached captions to print"),
        flag("-k", type=int, default=5, help="neighbours to print (default 5)"),
    ],
    "catalog": [
        flag(
            "sql",
            nargs="?",
            help="a DuckDB query over the views metadata, curated, funnel, features, "
            "feature_failures, evaluations, runs, training_metrics, downloads, download_latest",
        )
    ],
    "train": [
        flag("--stage", type=int, choices=[1, 2], required=True, help="1: pretrain, 2: finetune"),
        flag("--resume", action="store_true", help="continue the newest run of the stage"),
        flag("--local", action="store_true", help="one worker in this process, without Ray"),
        flag("--max-steps", type=int, help="stop after this many steps (the schedule is unchanged)"),
    ],
    "retrain": [
        flag(
            "--serve",
            action="store_true",
            help="stay up and retrain on retrain.cron in retrain.timezone (a "
            "Prefect schedule served by this process) until interrupted",
        ),
    ],
    "evaluate": EVALUATE,
    "generate": GENERATE,
    "chat": CHAT,
    "imagine": IMAGINE,
    "serve": SERVE,
    "convert": CONVERT,
    "runs": [
        flag(
            "what",
            nargs="*",
            help="nothing: list every training run; RUN: write that run's report; compare RUN RUN [RUN ...]: the "
            "settings that differ and the curves on the same axes (a run: its id, or a part naming one run)",
        )
    ],
}


def flags_of(command: str) -> list[Flag]:
    """Every flag of a command: the common ones, then its own."""
    return COMMON + OPTIONS.get(command, [])
