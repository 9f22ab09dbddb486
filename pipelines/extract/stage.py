"""Extract: ImageBind image and text features of every downloaded shard into Parquet, once, with Ray Data."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from model.imagebind.encoder import encoder_id_for
from pipelines import assets, ray_runtime
from pipelines.config import Config
from pipelines.console import Progress, quiet_ray_data
from pipelines.errors import InputError
from pipelines.extract import encode as extract_encode
from pipelines.extract import read as extract_read
from stores import features
from stores.catalog import outputs
from stores.lease import lease
from stores.ledger import Ledger
from stores.workspace import Workspace

log = logging.getLogger(__name__)


class SourceExtract(BaseModel):
    """What extraction did for one source."""

    source: str
    shards: int
    new_shards: int
    failed_shards: dict[str, str]
    rows: int
    failures: int
    output: str


class ExtractResult(BaseModel):
    """What the extract stage produced."""

    encoder_id: str
    sources: list[SourceExtract]
    images_per_second: float | None = Field(description="from submitting the work, worker start-up included")
    steady_images_per_second: float | None = Field(description="after the first batch came back")
    seconds: float

    def summary(self) -> str:
        """Human lines."""
        rate = f" at {self.images_per_second:.1f} images/s" if self.images_per_second else ""
        lines = [f"feature set {self.encoder_id}{rate}"]
        for s in self.sources:
            lines.append(
                f"{s.source}: {s.rows} features, {s.failures} failed samples in {s.shards} shard(s) "
                f"({s.new_shards} new) -> {s.output}"
            )
            lines += [f"  shard {sid} failed: {err}" for sid, err in s.failed_shards.items()]
        return "\n".join(lines)


def shard_items(ws: Workspace, source: str) -> list[dict[str, Any]]:
    """Every committed download shard of a source (first round and retry rounds) as extraction work items, each with
    the sha256 its download committed the tar with (the reader refuses a tar whose bytes differ)."""
    items = []
    for out in outputs(ws, "download"):
        if out != source and not out.startswith(f"{source}.retry-"):
            continue
        prefix = f"retry-{out.partition('.retry-')[2]}-" if ".retry-" in out else ""
        for rec in sorted(Ledger.reader(ws, "download", out).committed().values(), key=lambda r: r.shard_id):
            tar = next(f for f in rec.files if f.path.endswith(".tar"))
            items.append(
                {
                    "source": source,
                    "shard": prefix + rec.shard_id,
                    "tar": tar.path,
                    "sha256": tar.sha256,
                    "input": rec.fingerprint,
                }
            )
    return items


def _device(cfg: Config) -> str:
    import ray

    if cfg.extract.device != "auto":
        return cfg.extract.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def feature_settings(encoder_id: str, vocab: bytes, device: str, dtype: str, fp8: bool) -> dict[str, Any]:
    """The settings that shape a feature set's values; a run with others is refused (`--force` redoes it).

    A half dtype on a GPU holds the weights in it (not autocast over float32 weights, as on the CPU), and FP8
    quantises the vision trunk: both change the features, so each is named, but only when it is on, so that the
    feature sets made before either existed keep their settings.
    """
    settings: dict[str, Any] = {
        "encoder_id": encoder_id,
        "vocab": hashlib.sha256(vocab).hexdigest()[:16],
        "dtype": dtype,
    }
    if device == "cuda" and dtype != "float32":
        settings["weights"] = dtype
    if fp8:
        if device != "cuda" or dtype != "bfloat16":
            raise InputError(
                f"extract.fp8 needs a CUDA GPU (compute capability >= 8.9) and bfloat16; this run is "
                f"{dtype} on {device}: set extract.fp8 false"
            )
        settings["fp8"] = True
    return settings


def build_dataset(cfg: Config, ws: Workspace, items: list[dict], vocab: bytes, encoder_args: dict) -> Any:
    """Ray Data: read + decode + preprocess a shard per CPU task, then encode in an actor pool (one actor per GPU)."""
    import ray

    gpu = encoder_args["device"] == "cuda"
    actors = int(ray.cluster_resources().get("GPU", 1)) if gpu and cfg.extract.actors == 1 else cfg.extract.actors
    # Shards come back in input order, so each completes (and is committed, and leaves the driver's memory) in turn.
    context = ray.data.DataContext.get_current()
    quiet_ray_data(context)
    options = context.execution_options
    options.preserve_order = True
    if cfg.extract.buffer_mb:  # readers outrun a CPU encoder: without a bound they fill Ray's default share
        options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=cfg.extract.buffer_mb * 2**20
        )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # One CPU task per shard reads, decodes, crops and tokenizes it into columns (no torch in these workers); its CPU
    # share differs from the actor's, so Ray keeps it a separate task beside the encoder instead of fusing them.
    reader = {
        "root": ws.root,
        "storage_options": dict(ws.storage_options),
        "vocab": vocab,
        "caption_max_chars": cfg.curate.caption_max_chars,
        "max_pixels": cfg.model.max_image_pixels,
    }
    ds = ds.map_batches(
        extract_read.read_shards, fn_kwargs=reader, batch_size=1, batch_format="numpy", num_cpus=cfg.extract.task_cpus
    )
    local = {} if cfg.ray.address else {"max_restarts": 0}
    with warnings.catch_warnings():  # Ray 2.60 deprecates remote kwargs, yet documents max_restarts=0 this way
        warnings.simplefilter("ignore", DeprecationWarning)
        return _encoder_stage(cfg, ds, encoder_args, actors, gpu, local)


def _placeholder(cfg: Config, encoder_args: dict[str, Any]) -> np.ndarray:
    """The feature set's placeholder feature, computed in one Ray task with the encoder actors' resources (the model
    loads there, on a GPU when the actors have one, never in the driver)."""
    import ray

    gpu = encoder_args["device"] == "cuda"
    task = ray.remote(extract_encode.placeholder_feature).options(
        num_gpus=1 if gpu else 0, num_cpus=cfg.extract.actor_cpus, max_retries=0
    )
    return ray.get(task.remote(**encoder_args))


def _encoder_stage(
    cfg: Config, ds: Any, encoder_args: dict[str, Any], actors: int, gpu: bool, remote: dict[str, Any]
) -> Any:
    """The encoder actors. On one machine a crashed actor is not restarted (`remote`: max_restarts 0): a crash would
    only repeat, and a restartable actor makes Ray log an error line about its constructor arguments."""
    import ray

    # A GPU actor takes its next batch while the GPU computes the last one (`extract_encode.Encoder`); its calls
    # share one torch thread, so only the waiting and Ray's batching run side by side.
    overlap = {"max_concurrent_calls_per_actor": extract_encode.CALLS_IN_FLIGHT, "enable_true_multi_threading": True}
    return ds.map_batches(
        extract_encode.Encoder,
        fn_constructor_kwargs={**encoder_args, "threads": int(cfg.extract.actor_cpus)},
        batch_format="numpy",
        batch_size=cfg.extract.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors, **(overlap if gpu else {})),
        num_gpus=1 if gpu else 0,
        num_cpus=cfg.extract.actor_cpus,
        **({"resources": cfg.extract.actor_resources} if cfg.extract.actor_resources else {}),
        **remote,
    )


class ShardCollector:
    """Gathers a shard's rows as they stream back and commits the shard once all of them are there."""

    def __init__(self, ws: Workspace, ledgers: dict[str, Ledger], encoder_id: str) -> None:
        self.ws, self.ledgers, self.encoder_id = ws, ledgers, encoder_id
        self.parts: dict[tuple[str, str], list[dict[str, np.ndarray]]] = defaultdict(list)
        self.seen: dict[tuple[str, str], int] = defaultdict(int)
        self.failed: dict[str, dict[str, str]] = defaultdict(dict)
        self.committed: dict[str, int] = defaultdict(int)

    def add(self, batch: dict[str, np.ndarray]) -> int:
        """Take one batch; returns the number of samples it finished."""
        keys = list(zip(batch["source"], batch["shard"], strict=True))
        done = 0
        for key in dict.fromkeys(keys):
            rows = {k: v[[i for i, kk in enumerate(keys) if kk == key]] for k, v in batch.items()}
            kind = rows["kind"][0]
            if kind == "shard_error":
                self.ledgers[key[0]].record_failure(key[1], str(rows["error"][0]))
                self.failed[key[0]][key[1]] = str(rows["error"][0])
                continue
            self.parts[key].append(rows)
            self.seen[key] += len(rows["kind"]) if kind == "sample" else 0
            if kind == "empty" or self.seen[key] == int(rows["shard_rows"][0]):
                done += self.seen[key]
                self._commit(key)
        return done

    def _commit(self, key: tuple[str, str]) -> None:
        source, shard = key
        parts = self.parts.pop(key)
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.seen.pop(key, None)
        samples = rows["kind"] == "sample"
        ok = samples & (rows["reason"] == "")
        with self.ws.scratch() as scratch, self.ledgers[source].shard(shard) as pending:
            part, fails = os.path.join(scratch, "part.parquet"), os.path.join(scratch, "failures.parquet")
            n = features.write_features(
                part,
                {
                    "uid": rows["uid"][ok],
                    "source": rows["source"][ok],
                    "caption": rows["caption"][ok],
                    "url": rows["url"][ok],
                    "image_emb": rows["image_emb"][ok],
                    "text_emb": rows["text_emb"][ok],
                    "clip_score": rows["clip_score"][ok],
                    "encoder_id": [self.encoder_id] * int(ok.sum()),
                },
                rows["image_emb"].shape[1],
            )
            bad = samples & ~ok
            features.write_failures(
                fails, {k: rows[k][bad].tolist() for k in ("uid", "source", "url", "caption", "reason")}
            )
            pending.put(part, self.ws.features(self.encoder_id, source, f"part-{shard}.parquet"))
            pending.put(fails, self.ws.features(self.encoder_id, source, f"failures-{shard}.parquet"))
            pending.rows = n
            pending.extra = {"input": str(rows["input"][0]), "failures": int(bad.sum())}
        self.committed[source] += 1


def run(cfg: Config, force: bool = False) -> ExtractResult:
    """Featurise every committed download shard not yet in the feature set; commit each shard when complete."""
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    m = cfg.model
    encoder_id = encoder_id_for(m.imagebind, m.imagebind_checkpoint, cfg.seed)
    names = [s.name for s in cfg.sources]
    with contextlib.ExitStack() as held:  # one run at a time writes a source's features: refused before any work
        for s in names:
            held.enter_context(lease(ws, "extract", f"{encoder_id}.{s}"))
        return _extract(cfg, ws, encoder_id, names, force, start)


def _extract(cfg: Config, ws: Workspace, encoder_id: str, names: list[str], force: bool, start: float) -> ExtractResult:
    """The extraction of `run`, under the leases of its outputs."""
    m = cfg.model
    downloaded = {s: shard_items(ws, s) for s in names}  # the download ledgers, read once
    if not any(downloaded.values()):  # before the demo's vocabulary is learned from the captions
        raise InputError(
            f"no downloaded shards of {', '.join(names) or 'any source'} in {ws.url()}: run `ibllm download` first"
        )
    vocab = assets.clip_vocab_bytes(cfg, ws)
    ray_runtime.connect(cfg)
    device = _device(cfg)
    dtype = cfg.extract.dtype if cfg.extract.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    settings = feature_settings(encoder_id, vocab, device, dtype, cfg.extract.fp8)
    ledgers = {
        s: Ledger(ws, "extract", f"{encoder_id}.{s}", settings, encoder_id=encoder_id, force=force) for s in names
    }
    items = [
        {**it, "kind": "shard"}
        for s in names
        for it in downloaded[s]
        if not ledgers[s].is_current(it["shard"], it["input"])
    ]
    encoder_args = {
        "preset": m.imagebind,
        "checkpoint": m.imagebind_checkpoint,
        "seed": cfg.seed,
        "device": device,
        "dtype": dtype,
        "fp8": cfg.extract.fp8,
    }
    meta = features.read_meta(ws, encoder_id)
    if meta is None or meta.get("settings") != settings:  # once per feature set, before its first shard
        emb = _placeholder(cfg, encoder_args)
        features.write_meta(
            ws,
            encoder_id,
            {
                "encoder_id": encoder_id,
                "settings": settings,
                "preset": m.imagebind,
                "checkpoint": m.imagebind_checkpoint,
                "dim": len(emb),
                "placeholder": [float(v) for v in emb],
            },
        )
    collector = ShardCollector(ws, ledgers, encoder_id)
    images, enc_start, first = 0, time.perf_counter(), None
    if items:
        ds = build_dataset(cfg, ws, items, vocab, encoder_args)
        progress = Progress(log, "extract")
        for batch in ds.iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=cfg.extract.prefetch_batches
        ):
            if first is None:  # start-up (workers, model load) ends with the first batch back
                first, first_rows = time.perf_counter(), int((batch["kind"] == "sample").sum())
            images += collector.add(batch)
            progress.update(images, None, f"images in {sum(collector.committed.values())} new shard(s)")
    end = time.perf_counter()
    took = end - enc_start
    steady = (images - first_rows) / (end - first) if first and end > first and images > first_rows else None
    results = []
    for s in names:
        committed = ledgers[s].committed()
        results.append(
            SourceExtract(
                source=s,
                shards=len(committed),
                new_shards=collector.committed[s],
                failed_shards=collector.failed[s],
                rows=sum(r.rows for r in committed.values()),
                failures=sum(int(r.extra.get("failures", 0)) for r in committed.values()),
                output=ws.as_url(ws.features(encoder_id, s)),
            )
        )
    return ExtractResult(
        encoder_id=encoder_id,
        sources=results,
        images_per_second=round(images / took, 1) if images and took > 0 else None,
        steady_images_per_second=round(steady, 1) if steady else None,
        seconds=round(time.perf_counter() - start, 3),
    )
