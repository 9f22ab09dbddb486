"""The `ibllm` command line: one sub-command per stage, each taking a config, overrides and --json."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from pydantic import BaseModel

from flows import exits, options
from flows.exits import BriefFormatter
from flows.interrupts import Interrupts
from pipelines import stop
from pipelines.config import Config, load_config, with_settings
from pipelines.config.names import ZERO_SHOT
from pipelines.console import quiet_console
from pipelines.errors import InputError
from pipelines.paths import ENCODER_PATHS, MODEL_PATHS, check_model_paths, check_workspace, is_url

log = logging.getLogger("ibllm")
Command = Callable[[Config, argparse.Namespace], BaseModel | None]


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


def cmd_runs(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """List the training runs, write one run's report, or compare runs."""
    from pipelines.runs import stage as runs

    return runs.run(cfg, args.what)


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
        return evaluate.run(cfg, args.stage)
    if not args.data:
        raise InputError(f"--benchmark {args.benchmark} needs --data (the benchmark's folder or file)")
    subtasks = [s.strip() for s in args.subtasks.split(",") if s.strip()] if args.subtasks else None
    if args.benchmark in ZERO_SHOT:
        return zeroshot_stage.run(cfg, ZERO_SHOT[args.benchmark], args.data, limit=args.limit)
    return benchmark.run(cfg, args.benchmark, args.data, limit=args.limit, subtasks=subtasks, images=args.images)


def cmd_retrain(cfg: Config, args: argparse.Namespace) -> BaseModel | None:
    """Retrain on the shards new since the last retrain and promote the model only when it is at least as good (the
    `retrain` flow, as the deployment runs it)."""
    from flows.retrain import retrain_flow, scheduled

    if args.serve:
        from prefect import serve

        log.info("retraining on %r (%s) until interrupted (Ctrl-C)", cfg.retrain.cron, cfg.retrain.timezone)
        serve(scheduled(cfg))
        return None
    return retrain_flow(cfg, force=args.force)


def cmd_convert(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Convert released weights: `llama` (Meta -> transformers), `adapter` (official 7B.pth -> ours), `export`."""
    from pipelines.convert import stage as convert

    if args.kind == "llama":
        return convert.llama(args.source, args.output, args.dtype, args.vocab_size, args.overwrite)
    if args.kind == "adapter":
        return convert.adapter(args.source, args.output, args.vocab_size, args.overwrite)
    return convert.export(args.source, args.output, args.overwrite)


def cmd_generate(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Answer a prompt about any mix of image, audio, video, point-cloud and text inputs, or every request of a
    JSONL file."""
    from pipelines.infer import stage as infer
    from pipelines.runtime.inputs import check_weighted_inputs, read_history

    request = _request(cfg, args)
    if not args.requests:  # with a requests file the options are defaults: a line may give the input they weigh
        check_weighted_inputs(request)
    if args.history:
        if args.requests:
            raise InputError(
                "--history is the conversation of one request: with --requests give each line its own history field"
            )
        request = request.model_copy(update={"history": read_history(args.history)})
    if args.output and os.path.exists(args.output) and not args.force:
        raise InputError(f"--output {args.output} exists: add --force to replace it")
    annotate = _grounder(cfg, args)  # its settings checked before any model loads
    return infer.run(cfg, request, requests_file=args.requests, output=args.output, annotate=annotate)


def _grounder(cfg: Config, args: argparse.Namespace) -> Any:
    """generate's --ground: the detector's grounding of each answer (None without --ground; its other options
    alone are refused)."""
    from pipelines.apps.ground import Grounder, GroundOptions

    if not args.ground:
        if args.ground_threshold is not None or args.ground_out:
            raise InputError("--ground-threshold and --ground-out go with --ground")
        return None
    if args.ground_out and not args.requests and os.path.exists(args.ground_out) and not args.force:
        raise InputError(f"--ground-out {args.ground_out} exists: add --force to replace it")
    given = {} if args.ground_threshold is None else {"threshold": args.ground_threshold}
    return Grounder(cfg, GroundOptions(out=args.ground_out, **given), cfg.infer.device).ground


def _request(cfg: Config, args: argparse.Namespace) -> Any:
    """The request of generate's or imagine's input options (a line of --requests overrides its fields)."""
    from pipelines.runtime.inputs import make_request, parse_weights

    fields = {m: getattr(args, m) for m in ("image", "audio", "video", "point", "text")}
    seed = cfg.seed if args.seed is None else args.seed
    return make_request(fields | {"weights": parse_weights(args.weight), "prompt": args.prompt, "seed": seed})


def cmd_imagine(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Draw images from any mix of image, audio, video, point-cloud and text inputs: their ImageBind embedding
    (mixed with the visual cache on --cache) conditions Stable unCLIP (imagine.generator)."""
    from pipelines.apps import imagine
    from pipelines.runtime.inputs import check_weighted_inputs

    request = _request(cfg, args)
    if not args.requests:
        check_weighted_inputs(request)
    return imagine.run(cfg, request, out=args.picture, requests_file=args.requests, force=args.force)


def cmd_chat(cfg: Config, args: argparse.Namespace) -> BaseModel:
    """Talk with the model in the terminal: questions, /image, /audio, /video, /point PATH, /reset, /quit."""
    from pipelines.infer import chat

    inputs = {m: getattr(args, m) for m in ("image", "audio", "video", "point")}
    return chat.run(chat.start(cfg, inputs, args.seed), sys.stdin, args.out)


def cmd_serve(cfg: Config, args: argparse.Namespace) -> None:
    """Serve the model: the OpenAI-style API at /v1/chat/completions and the chat page at /, until interrupted."""
    from pipelines.serve import stage as serve

    if args.ray:
        from pipelines.serve import ray_app

        url = ray_app.start(cfg)
        try:
            _wait_for_interrupt(f"serving on Ray Serve at {url} ({cfg.serve.replicas} replica(s)); Ctrl-C stops")
        finally:
            ray_app.stop()
        return
    serve.run(cfg)


def _wait_for_interrupt(message: str) -> None:
    """Until Ctrl-C or SIGTERM (the command then ends as asked: exit 0)."""
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
    "runs": (cmd_runs, "list training runs (status, steps, losses); RUN: its report; compare A B: side by side"),
    "evaluate": (cmd_evaluate, "held-out loss, perplexity and the visual-grounding gap of a checkpoint"),
    "retrain": (cmd_retrain, "extract, index and train on what is new; promote when at least as good; --force"),
    "generate": (cmd_generate, "answer about images, audio, video, point clouds and text (or a JSONL of requests)"),
    "imagine": (cmd_imagine, "draw images from images, audio, video, point clouds and text (Stable unCLIP)"),
    "chat": (cmd_chat, "a multi-turn conversation in the terminal about images, audio, video and point clouds"),
    "serve": (cmd_serve, "the HTTP API (OpenAI chat format, streaming) and a web chat page; --ray for Ray Serve"),
    "convert": (cmd_convert, "convert released weights: Meta LLaMA, the official adapter 7B.pth, or ours back"),
    "config": (cmd_config, "print the resolved configuration (after --set and --workspace)"),
}


# The model settings each command loads (checked before it starts); commands absent here load no model.
MODEL_INPUTS: dict[str, tuple[str, ...]] = {
    "extract": ENCODER_PATHS,
    "index": ENCODER_PATHS,
    "train": MODEL_PATHS,
    "evaluate": MODEL_PATHS,
    "imagine": (*ENCODER_PATHS, "point_checkpoint"),
    "retrain": MODEL_PATHS,
    "generate": MODEL_PATHS,
    "chat": MODEL_PATHS,
    "serve": MODEL_PATHS,
    "demo": MODEL_PATHS,
}
NO_WORKSPACE = ("config", "convert")
ANSWERING = ("generate", "chat", "serve", "runs")  # commands that read what was trained in an existing workspace


def check_inputs(cfg: Config, command: str) -> None:
    """Before a command runs: its local workspace can be created (or, for a command that answers with a trained
    model, exists: a mistyped --workspace is named, not created empty), and the model files it loads exist."""
    local = not is_url(cfg.workspace)
    if command in ANSWERING and local and not os.path.isdir(cfg.workspace):
        raise InputError(f"workspace {cfg.workspace} does not exist: {command} answers with a model trained there")
    if command not in NO_WORKSPACE:
        check_workspace(cfg)
    check_model_paths(cfg, MODEL_INPUTS.get(command, ()))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ibllm`, built from the table of options (flows/options.py)."""
    parser = argparse.ArgumentParser(
        prog="ibllm",
        description="ImageBind-LLM training system: curate, featurise, index, train and serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        options.add(p, options.flags_of(name))
        p.set_defaults(func=func)
    return parser


def _configure_logging(verbose: bool, debug: bool) -> None:
    fmt, datefmt = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, format=fmt, datefmt=datefmt
    )
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
    with Interrupts().installed() as interrupts:
        return _run(args, interrupts)


def _run(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """The command, its result on stdout, and its exit status (130/143 when interrupted, saying what was kept)."""
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        cfg = with_settings(cfg, *_flag_settings(args))
        check_inputs(cfg, args.command)
        # stdout carries only the result: anything else printed, by any process, goes to stderr.
        with _stdout_to_stderr() as out:
            args.out = out  # the real stdout, for a command that talks (chat)
            result = args.func(cfg, args)
    except KeyboardInterrupt:
        print(f"ibllm: interrupted; {stop.kept()}", file=sys.stderr)
        return interrupts.exit_code
    except Exception as e:
        if stop.requested():  # a library's own handling of the signal (Ray Train aborting the run) raised this
            print(f"ibllm: interrupted ({type(e).__name__}); {stop.kept()}", file=sys.stderr)
            return interrupts.exit_code
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


def _flag_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The settings the command's flags stand for, and how they were typed (for an error naming them)."""
    flags = options.flags_of(args.command)
    given = options.settings_given(flags, args)
    typed = " ".join(f"{f.names[-1]} {getattr(args, f.dest)}" for f in flags if f.setting in given)
    return given, typed


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
