"""The `ibllm` command line: one sub-command per stage, each taking a config, overrides and --json."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from pydantic import BaseModel, ValidationError

from flows import exits
from flows.exits import BriefFormatter
from pipelines.config import Config, load_config
from pipelines.console import quiet_console
from pipelines.errors import InputError
from pipelines.evaluate.names import BENCHMARKS, ZERO_SHOT
from pipelines.paths import ENCODER_PATHS, MODEL_PATHS, check_model_paths, check_workspace

log = logging.getLogger("ibllm")
Command = Callable[[Config, argparse.Namespace], BaseModel | None]


def _stage_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="YAML config (default: the packaged configs/demo.yaml)")
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set download.timeout=5 (repeatable; values are YAML)",
    )  # fmt: skip
    common.add_argument("--workspace", help="workspace root: a folder or an fsspec URL such as s3://bucket/run")
    common.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    common.add_argument("--force", action="store_true", help="discard outputs made with other settings and redo")
    common.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and everything Ray, img2dataset, autofaiss and Prefect print")  # fmt: skip
    return common


def cmd_config(cfg: Config, args: argparse.Namespace) -> Config:
    """Print the resolved configuration (YAML; JSON with --json) on stdout."""
    return cfg


def cmd_synthetic(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Write the synthetic source, check what the server answers, and optionally keep serving."""
    from flows.demo_hook import prepared

    with prepared(cfg, "synthetic", force=args.force) as result:
        if args.serve:
            _wait_for_interrupt(f"serving {result.base_url} until interrupted (Ctrl-C)")
    return result


def cmd_ingest(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Normalise every source's metadata files into sources/<source>/ (one shard per file)."""
    from pipelines.ingest import stage as ingest

    return ingest.run(cfg, force=args.force)


def cmd_curate(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Filter every source into url lists, with the funnel of every filter."""
    from pipelines.curate import stage as curate

    return curate.run(cfg, force=args.force)


def cmd_download(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Download the curated url lists into webdataset shards with img2dataset (resumable)."""
    from flows.demo_hook import prepared
    from pipelines.download import stage as download

    with prepared(cfg, "download"):  # the demo's synthetic source is served meanwhile
        return download.run(cfg, force=args.force, retry_failed=args.retry_failed)


def cmd_extract(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Compute ImageBind image and text features of every downloaded shard into Parquet (Ray, resumable)."""
    from flows.demo_hook import prepared
    from pipelines.extract import stage as extract

    with prepared(cfg, "extract"):  # the demo's vocabulary, when none is configured
        return extract.run(cfg, force=args.force)


def cmd_index(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Build the visual cache over `index.source`'s features (when they changed); --query-image looks into it."""
    from pipelines.index import stage as index

    return index.run(cfg, force=args.force, query_image=args.query_image, k=args.k)


def cmd_report(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Write the curation report (HTML, figures, summary.json) and refresh the catalog."""
    from pipelines.report import stage as report

    return report.run(cfg)


def cmd_catalog(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """One SQL query over the catalog's views (default: download outcomes by source and reason)."""
    from pipelines.report import query

    return query.run(cfg, args.sql)


def cmd_demo(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Run every stage on the config through the Prefect `pipeline` flow."""
    from flows.pipeline import pipeline_flow

    return pipeline_flow(cfg, force=args.force)


def cmd_train(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Train stage 1 (bind network, gates, prefix) or stage 2 (LoRA, biases, norms) on cached features."""
    from flows.demo_hook import prepared
    from pipelines.train import stage as train

    with prepared(cfg, "train", train_stage=args.stage):  # the demo's stage 0 and conversations, when missing
        return train.run(cfg, args.stage, resume=args.resume, local=args.local, max_steps=args.max_steps)


def cmd_base(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Stage 0 of the demo: train its small base LLaMA and tokenizer on the synthetic language (once)."""
    from flows.demo_hook import prepared

    with prepared(cfg, "base", force=args.force) as result:
        return result


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Held-out loss and perplexity of a checkpoint, and the loss with the visual features shuffled; or, with
    --benchmark, MME, a VQA set, caption scores or a zero-shot check of the encoders."""
    from pipelines.evaluate import benchmark, zeroshot_stage
    from pipelines.evaluate import stage as evaluate

    if args.benchmark is None:
        if args.data:
            raise InputError("--data is the data of a --benchmark (mme, vqa, captions, zeroshot-image, ...)")
        return evaluate.run(cfg, args.stage, checkpoint=args.checkpoint)
    if not args.data:
        raise InputError(f"--benchmark {args.benchmark} needs --data (the benchmark's folder or file)")
    subtasks = [s.strip() for s in args.subtasks.split(",") if s.strip()] if args.subtasks else None
    if args.benchmark in ZERO_SHOT:
        return zeroshot_stage.run(cfg, ZERO_SHOT[args.benchmark], args.data, limit=args.limit,
                                  batch=args.batch, device=args.device, dtype=args.dtype)  # fmt: skip
    return benchmark.run(cfg, args.benchmark, args.data, checkpoint=args.checkpoint, cache=args.cache,
                         limit=args.limit, subtasks=subtasks, images=args.images, batch=args.batch,
                         device=args.device, dtype=args.dtype)  # fmt: skip


def cmd_retrain(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Retrain on the shards new since the last retrain and promote the model only when it is at least as good (the
    `retrain` flow, as the deployment runs it)."""
    from flows.retrain import retrain_flow

    return retrain_flow(cfg, force=args.force)


def cmd_convert(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Convert released weights: `llama` (Meta -> transformers), `adapter` (official 7B.pth -> ours), `export`."""
    from pipelines.convert import stage as convert

    if args.kind == "llama":
        return convert.llama(args.source, args.output, args.dtype, args.vocab_size, args.overwrite)
    if args.kind == "adapter":
        return convert.adapter(args.source, args.output, args.vocab_size or 32000, args.overwrite)
    return convert.export(args.source, args.output, args.overwrite)


def cmd_generate(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Answer a prompt about any mix of image, audio, video, point-cloud and text inputs, or every request of a
    JSONL file."""
    from pipelines.infer import stage as infer
    from pipelines.infer.inputs import check_weighted_inputs, make_request, parse_weights, read_history

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    request = make_request(
        {"image": args.image, "audio": args.audio, "video": args.video, "point": args.point, "text": args.text,
         "weights": parse_weights(args.weight), "prompt": args.prompt,
         "seed": cfg.seed if args.seed is None else args.seed} | {k: v for k, v in sampling.items() if v is not None}
    )  # fmt: skip
    if not args.requests:  # with a requests file the options are defaults: a line may give the input they weigh
        check_weighted_inputs(request)
    if args.history:
        if args.requests:
            raise InputError("--history is the conversation of one request: with --requests give each line its "
                             "own history field")  # fmt: skip
        request = request.model_copy(update={"history": read_history(args.history)})
    if args.output and os.path.exists(args.output) and not args.force:
        raise InputError(f"--output {args.output} exists: add --force to replace it")
    return infer.run(cfg, request, requests_file=args.requests, checkpoint=args.checkpoint, cache=args.cache,
                     output=args.output, device=args.device, dtype=args.dtype, batch=args.batch,
                     ground=_ground_options(args))  # fmt: skip


def _ground_options(args: argparse.Namespace) -> Any:
    """generate's --ground options (None without --ground; its other options alone are refused)."""
    from pipelines.apps.ground import GroundOptions

    if not args.ground:
        if args.ground_threshold is not None or args.ground_out:
            raise InputError("--ground-threshold and --ground-out go with --ground")
        return None
    if args.ground_out and not args.requests and os.path.exists(args.ground_out) and not args.force:
        raise InputError(f"--ground-out {args.ground_out} exists: add --force to replace it")
    threshold = 0.1 if args.ground_threshold is None else args.ground_threshold
    return GroundOptions(threshold=threshold, out=args.ground_out)


def cmd_imagine(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Draw images from any mix of image, audio, video, point-cloud and text inputs: their ImageBind embedding
    (mixed with the visual cache on --cache) conditions Stable unCLIP (imagine.generator)."""
    from pipelines.apps import imagine
    from pipelines.infer.inputs import check_weighted_inputs, make_request, parse_weights

    request = make_request({"image": args.image, "audio": args.audio, "video": args.video, "point": args.point,
                            "text": args.text, "weights": parse_weights(args.weight), "prompt": args.prompt,
                            "seed": cfg.seed if args.seed is None else args.seed})  # fmt: skip
    if not args.requests:
        check_weighted_inputs(request)
    options = {"steps": "steps", "guidance": "guidance", "images": "num_images", "batch": "batch",
               "noise_level": "noise_level", "size": "size"}  # fmt: skip
    for key, option in options.items():
        if getattr(args, option) is not None:
            try:
                setattr(cfg.imagine, key, getattr(args, option))
            except ValidationError as e:
                raise InputError(f"--{option.replace('_', '-')}: {e.errors()[0]['msg']}") from None
    return imagine.run(cfg, request, out=args.picture, requests_file=args.requests, cache=args.cache,
                       generator=args.generator, device=args.device, dtype=args.dtype, force=args.force)  # fmt: skip


def cmd_chat(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Talk with the model in the terminal: questions, /image, /audio, /video PATH, /reset, /quit."""
    from pipelines.infer import chat
    from pipelines.infer import stage as infer
    from pipelines.infer.inputs import make_request

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    defaults = make_request({"seed": cfg.seed if args.seed is None else args.seed}
                            | {k: v for k, v in sampling.items() if v is not None})  # fmt: skip
    checkpoint = infer.choose_checkpoint(infer.workspace_of(cfg), args.checkpoint)
    given = {m: getattr(args, m) for m in ("image", "audio", "video", "point")}
    answerer, _ = infer.load_answerer(cfg, checkpoint, need_encoder=any(given.values()), use_cache=args.cache,
                                      device=args.device, dtype=args.dtype, slots=1)  # fmt: skip
    session = chat.Chat(answerer, defaults)
    for modality, paths in given.items():
        for path in paths:
            session.add_input(modality, path)
    log.info("chatting with %s", checkpoint)
    return chat.run(session, sys.stdin, args.out)


def cmd_serve(cfg: Config, args: argparse.Namespace) -> None:
    """Serve the model: the OpenAI-style API at /v1/chat/completions and the chat page at /, until interrupted."""
    from pipelines.serve import stage as serve

    if args.host:
        cfg.serve.host = args.host
    if args.port is not None:
        cfg.serve.port = args.port
    if args.cache:
        cfg.serve.cache = True
    if args.ray:
        from pipelines.serve import ray_app

        if args.replicas:
            cfg.serve.replicas = args.replicas
        url = ray_app.start(cfg, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype)
        try:
            _wait_for_interrupt(f"serving on Ray Serve at {url} ({cfg.serve.replicas} replica(s)); Ctrl-C stops")
        finally:
            ray_app.stop()
        return
    serve.run(cfg, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype)


def _wait_for_interrupt(message: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # before saying so: a quick SIGTERM must find the handler
    log.info(message)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


COMMANDS: dict[str, tuple[Command, str]] = {
    "demo": (cmd_demo, "run every stage on the embedded default (configs/demo.yaml) and show what each made"),
    "synthetic": (cmd_synthetic, "write the synthetic demo source and serve it on loopback"),
    "ingest": (cmd_ingest, "normalise source metadata (LAION, MMC4, CC3M, CC12M, SBU, COCO, COYO, generic)"),
    "curate": (cmd_curate, "filter sources by CLIP score, size, caption, language, safety; dedup; url lists"),
    "download": (cmd_download, "download url lists into webdataset shards (img2dataset); --retry-failed"),
    "extract": (cmd_extract, "ImageBind features of the downloaded shards into Parquet with Ray (resumable)"),
    "index": (cmd_index, "build the visual cache index (autofaiss); --query-image X prints its nearest captions"),
    "report": (cmd_report, "write the curation report and the DuckDB catalog"),
    "catalog": (cmd_catalog, 'query the catalog\'s views with SQL, e.g. ibllm catalog "SELECT * FROM funnel"'),
    "base": (cmd_base, "demo stage 0: the small base LLaMA and tokenizer that stand in for LLaMA 7B"),
    "train": (cmd_train, "train stage 1 or 2 with Ray Train on the cached features; --resume continues a run"),
    "evaluate": (cmd_evaluate, "held-out loss, perplexity and the visual-grounding gap of a checkpoint"),
    "retrain": (cmd_retrain, "extract, index and train on what is new; promote when at least as good; --force"),
    "generate": (cmd_generate, "answer a prompt about images, audio, video and text (or a JSONL batch of requests)"),
    "imagine": (cmd_imagine, "draw images from images, audio, video, point clouds and text (Stable unCLIP)"),
    "chat": (cmd_chat, "a multi-turn conversation in the terminal about images, audio and video"),
    "serve": (cmd_serve, "the HTTP API (OpenAI chat format, streaming) and a web chat page; --ray for Ray Serve"),
    "convert": (cmd_convert, "convert released weights: Meta LLaMA, the official adapter 7B.pth, or ours back"),
    "config": (cmd_config, "print the resolved configuration (after --set and --workspace)"),
}


# The model settings each command loads (checked before it starts); commands absent here load no model.
MODEL_INPUTS: dict[str, tuple[str, ...]] = {
    "extract": ENCODER_PATHS, "index": ENCODER_PATHS, "train": MODEL_PATHS, "evaluate": MODEL_PATHS,
    "imagine": (*ENCODER_PATHS, "point_checkpoint"),
    "retrain": MODEL_PATHS, "generate": MODEL_PATHS, "chat": MODEL_PATHS, "serve": MODEL_PATHS,
    "demo": MODEL_PATHS,
}  # fmt: skip
NO_WORKSPACE = ("config", "convert")


def check_inputs(cfg: Config, command: str) -> None:
    """Before a command runs: its local workspace can be created, and the model files it loads exist."""
    if command not in NO_WORKSPACE:
        check_workspace(cfg)
    check_model_paths(cfg, MODEL_INPUTS.get(command, ()))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ibllm`."""
    parser = argparse.ArgumentParser(
        prog="ibllm",
        description="ImageBind-LLM training system: curate, featurise, index, train and serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _stage_options()
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=func.__doc__)
        p.set_defaults(func=func)
        if name == "catalog":
            p.add_argument("sql", nargs="?", help="a DuckDB query over the views metadata, curated, funnel, features, "
                           "feature_failures, evaluations, downloads, download_latest")  # fmt: skip
        if name == "synthetic":
            p.add_argument("--serve", action="store_true", help="keep serving until interrupted")
        if name == "index":
            p.add_argument("--query-image", metavar="PATH", help="an image whose nearest cached captions to print")
            p.add_argument("-k", type=int, default=5, help="neighbours to print (default 5)")
        if name == "train":
            p.add_argument("--stage", type=int, choices=[1, 2], required=True, help="1: pretrain, 2: finetune")
            p.add_argument("--resume", action="store_true", help="continue the newest run of the stage")
            p.add_argument("--local", action="store_true", help="one worker in this process, without Ray")
            p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule is unchanged)")
        if name == "evaluate":
            _evaluate_options(p)
        if name == "generate":
            _generate_options(p)
        if name == "chat":
            _chat_options(p)
        if name == "imagine":
            _imagine_options(p)
        if name == "serve":
            p.add_argument("--host", help="the address to listen on (default serve.host, 127.0.0.1)")
            p.add_argument("--port", type=int, help="the port (default serve.port, 8000)")
            p.add_argument("--cache", action="store_true", help="load the visual cache (serve.cache)")
            p.add_argument("--checkpoint", help="our checkpoint folder (default: the promoted model, else the newest)")
            p.add_argument("--ray", action="store_true", help="as a Ray Serve deployment (on ray.address, else local)")
            p.add_argument("--replicas", type=int, help="Ray Serve replicas (default serve.replicas)")
            _device_options(p)
        if name == "convert":
            p.add_argument("kind", choices=["llama", "adapter", "export"],
                           help="llama: Meta folder -> transformers folder; adapter: 7B.pth -> our checkpoint; "
                           "export: our checkpoint -> official .pth")  # fmt: skip
            p.add_argument("source", help="input: Meta folder, adapter .pth, or our checkpoint folder")
            p.add_argument("output", help="output folder (llama, adapter) or .pth file (export)")
            p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="llama: cast the weights")
            p.add_argument("--vocab-size", type=int, help="LLaMA's vocabulary: llama, when params.json says -1 "
                           "(default: the embedding's rows); adapter (default 32000)")  # fmt: skip
            p.add_argument("--overwrite", action="store_true", help="replace an existing output (folder or file)")
        if name == "download":
            p.add_argument(
                "--retry-failed", action="store_true",
                help="download again, into new shards, only the samples that failed for a retryable reason",
            )  # fmt: skip
    return parser


POINT_HELP = "a 3D point-cloud file: .npy, .pt, .ply, .pcd, .xyz, .pts or .obj (needs model.point_checkpoint)"


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", type=int, choices=[1, 2], default=1, help="newest complete run of this stage")
    p.add_argument("--checkpoint", help="a checkpoint folder instead (its model/ folder); with --benchmark the "
                   "default is the promoted model, else the newest run")  # fmt: skip
    p.add_argument("--benchmark", choices=BENCHMARKS, help="mme (MME's released folder), vqa (a JSONL of questions), "
                   "captions (a COCO captions file), zeroshot-image|audio|point (ImageNet, ESC-50, ModelNet40 "
                   "layouts): instead of the held-out loss")  # fmt: skip
    p.add_argument("--data", metavar="PATH", help="the benchmark's folder or file")
    p.add_argument("--images", metavar="DIR", help="captions: the images' folder (default: the file's folder)")
    p.add_argument("--subtasks", metavar="A,B", help="mme: only these subtasks (e.g. existence,color)")
    p.add_argument("--limit", type=int, help="only the first N questions (zero-shot: N samples, seeded shuffle)")
    p.add_argument("--cache", action="store_true", help="mix in the visual cache built by `ibllm index`")
    p.add_argument("--batch", type=int, default=16, help="questions decoded together (default 16)")
    _device_options(p)


def _generate_options(p: argparse.ArgumentParser) -> None:
    _input_options(p, "a text for ImageBind's text tower (not the prompt)")
    p.add_argument("--prompt", help="the instruction (default with inputs: 'Generate caption of this image')")
    p.add_argument("--cache", action="store_true", help="mix in the visual cache built by `ibllm index`")
    p.add_argument(
        "--checkpoint", help="our checkpoint folder (default: the newest complete stage-2, else stage-1 run)"
    )
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default 0.1)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.75)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default 256)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    p.add_argument(
        "--requests",
        metavar="FILE.jsonl",
        help="one JSON request per line: image/audio/video/text, weights, prompt, temperature, top_p, "
        "max_new_tokens, seed (the options above are the defaults)",
    )
    p.add_argument("--output", metavar="FILE.jsonl", help="write one JSON line per request there (default: stdout)")
    p.add_argument("--history", metavar="FILE.json", help="the conversation so far: OpenAI messages, ShareGPT turns "
                   "or [[question, answer], ...]; the prompt is its next question")  # fmt: skip
    p.add_argument("--batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--ground", action="store_true", help="find the answer's noun phrases in the input image with "
                   "the detector of model.detector (OWLv2, Grounding DINO): boxes in the result")  # fmt: skip
    p.add_argument("--ground-threshold", type=float, metavar="T", help="lowest box score kept (default 0.1)")
    p.add_argument("--ground-out", metavar="FILE.png", help="draw the boxes on the image there (a batch's line N: "
                   "FILE-N.png)")  # fmt: skip
    _device_options(p)


def _imagine_options(p: argparse.ArgumentParser) -> None:
    _input_options(p)
    p.add_argument("--prompt", help="a text prompt for unCLIP's own text encoder beside the embedding (default none)")
    p.add_argument("--cache", action="store_true", help="mix in the visual cache built by `ibllm index`")
    p.add_argument("--out", dest="picture", default="imagined.png", metavar="FILE.png",
                   help="the PNG (several: FILE-0.png, FILE-1.png, ...; --requests: FILE-LINE-0.png, ...)")  # fmt: skip
    p.add_argument("--generator", metavar="DIR", help="the Stable unCLIP folder (default imagine.generator)")
    p.add_argument("--seed", type=int, help="noise seed; image i of a request uses seed + i (default: the config's)")
    p.add_argument("--steps", type=int, help="denoising steps (default imagine.steps, 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default imagine.guidance, 10)")
    p.add_argument("--noise-level", type=int, help="noise added to the embedding, 0-999 (default 0)")
    p.add_argument("--size", type=int, help="pixels per side, a multiple of 8 (default: the generator's)")
    p.add_argument("--num-images", type=int, help="images per request (default imagine.images, 1)")
    p.add_argument("--requests", metavar="FILE.jsonl", help="one JSON request per line: image/audio/video/point/"
                   "text, weights, prompt, seed (the options above are the defaults)")  # fmt: skip
    p.add_argument("--batch", type=int, help="requests denoised together (default imagine.batch, 4)")
    _device_options(p)


def _input_options(p: argparse.ArgumentParser, text: str = "a text for ImageBind's text tower") -> None:
    """The inputs of generate and imagine: files of each modality, texts for the text tower, their weights."""
    inputs = {"image": "an image file", "audio": "an audio file", "video": "a video file", "text": text}
    for modality, what in inputs.items():
        p.add_argument(f"--{modality}", action="append", default=[], metavar="STRING" if modality == "text" else "PATH",
                       help=f"{what} (repeatable; several are averaged)")  # fmt: skip
    p.add_argument("--point-cloud", dest="point", action="append", default=[], metavar="PATH",
                   help=f"{POINT_HELP} (repeatable; several are averaged)")  # fmt: skip
    _point_options(p)
    p.add_argument("--weight", action="append", default=[], metavar="MODALITY=W",
                   help="weight of a modality in the mix, e.g. --weight audio=0.5 (default 1 each)")  # fmt: skip


def _chat_options(p: argparse.ArgumentParser) -> None:
    for modality in ("image", "audio", "video"):
        p.add_argument(f"--{modality}", action="append", default=[], metavar="PATH",
                       help=f"an {modality} file the conversation starts about (repeatable)")  # fmt: skip
    p.add_argument("--point-cloud", dest="point", action="append", default=[], metavar="PATH",
                   help=f"{POINT_HELP}, the conversation starts about (repeatable)")  # fmt: skip
    _point_options(p)
    p.add_argument("--cache", action="store_true", help="mix in the visual cache built by `ibllm index`")
    p.add_argument("--checkpoint", help="our checkpoint folder (default: the model in service, else the newest run)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default 0.1)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.75)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default 256)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    _device_options(p)


def _point_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalize-points", action="store_true", default=None,
                   help="centre point clouds and scale them into the unit sphere (model.point_normalize)")  # fmt: skip
    p.add_argument("--resample-points", type=int, metavar="N",
                   help="resample point clouds to N points, e.g. 8192 (model.point_resample)")  # fmt: skip


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="of the language model and encoder (auto: bfloat16 on a GPU, float32 on the CPU)")  # fmt: skip


def _configure_logging(verbose: bool, debug: bool) -> None:
    fmt, datefmt = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, format=fmt,
                        datefmt=datefmt)  # fmt: skip
    if not debug:  # a failure is one line; --debug shows where it came from
        for handler in logging.getLogger().handlers:
            handler.setFormatter(BriefFormatter(fmt, datefmt))
    quiet_console(verbose)  # before any stage imports tqdm or starts a process


def _emit(result: Any, as_json: bool, out: Any) -> None:
    if result is None:
        return
    if as_json:
        out.write(result.model_dump_json(indent=2) + "\n")
    else:
        text = result.summary() if hasattr(result, "summary") else result.model_dump_json(indent=2)
        if text:
            out.write(text + "\n")
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ibllm` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.debug)
    overrides = list(args.overrides)
    if args.workspace:
        overrides.append(f"workspace={args.workspace}")
    if getattr(args, "normalize_points", None):
        overrides.append("model.point_normalize=true")
    if getattr(args, "resample_points", None) is not None:
        overrides.append(f"model.point_resample={args.resample_points}")
    cfg = None
    try:
        cfg = load_config(args.config, overrides)
        check_inputs(cfg, args.command)
        # stdout carries only the result: anything else printed, by any process, goes to stderr.
        with _stdout_to_stderr() as out:
            args.out = out  # the real stdout, for a command that talks (chat)
            result = args.func(cfg, args)
    except KeyboardInterrupt:
        print("ibllm: interrupted; committed shards are kept, a rerun goes on from there", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug and exits.exit_code(e) == exits.UNEXPECTED:
            raise
        print(f"ibllm: {exits.message(e, workspace=cfg.workspace if cfg else None)}", file=sys.stderr)
        return exits.exit_code(e)
    _emit(result, args.json, sys.stdout)
    unfinished = exits.partial(result)
    if unfinished:
        print(f"ibllm: {unfinished}", file=sys.stderr)
        return exits.PARTIAL
    return exits.OK


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[TextIO]:
    """Point file descriptor 1 at stderr (child processes inherit it) and restore it afterwards."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        yield out
    finally:
        out.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    sys.exit(main())
