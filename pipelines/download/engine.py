"""img2dataset as the download engine, with our decoder in its resizer slot and our deadline-bounded, guarded fetch."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations would call home at import

from img2dataset import downloader as i2d_downloader
from img2dataset.downloader import Downloader

from pipelines import ray_runtime
from pipelines.config import Config
from pipelines.console import IMG2DATASET_CHATTER, filtered_output
from pipelines.download.decode import ImageDecoder, decoder_for
from pipelines.download.fetch import fetch

i2d_main = importlib.import_module("img2dataset.main")  # the package's `main` attribute is the CLI function
ADDITIONAL_COLUMNS = ["uid", "source", "similarity"]
# img2dataset 1.47 looks these names up when called: its per-sample fetch, and the downloader `download` builds.
_FETCH_NAME = "download_image_with_retry"
_DOWNLOADER_NAME = "Downloader"


class DeadlineDownloader(Downloader):
    """img2dataset's shard downloader with our decoder as its resizer, every sample under one deadline, and
    connections to public addresses only (plus `allow_private_addresses`).

    img2dataset builds it in the driver and ships it to its workers (spawned processes, Ray tasks), where
    `__call__` points img2dataset's per-sample fetch at ours before downloading the shard.
    """

    def __init__(
        self, decoder: ImageDecoder, deadline: float, allow_private_addresses: bool | Sequence[str], **kwargs: Any
    ) -> None:
        super().__init__(**{**kwargs, "resizer": decoder})
        self.deadline = deadline
        self.allow_private_addresses = allow_private_addresses

    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str]]:
        """Download one shard (img2dataset's contract: (done, row))."""
        # Every shard of a run has the same settings, so concurrent shards of one process agree on the values.
        ours = functools.partial(fetch, deadline=self.deadline, allow_private_addresses=self.allow_private_addresses)
        setattr(i2d_downloader, _FETCH_NAME, ours)
        return super().__call__(row)


@contextlib.contextmanager
def _engine(decoder: ImageDecoder, deadline: float, allow: bool | Sequence[str]) -> Iterator[None]:
    """img2dataset's `download` builds our downloader instead of its own while inside."""
    for module, name in ((i2d_downloader, _FETCH_NAME), (i2d_main, _DOWNLOADER_NAME)):
        if not hasattr(module, name):
            raise RuntimeError(
                f"img2dataset changed: {module.__name__}.{name} is gone, and the ibllm decoder and "
                "deadline are plugged in there (pipelines/download/engine.py)"
            )
    original = getattr(i2d_main, _DOWNLOADER_NAME)
    setattr(i2d_main, _DOWNLOADER_NAME, functools.partial(DeadlineDownloader, decoder, deadline, allow))
    try:
        yield
    finally:
        setattr(i2d_main, _DOWNLOADER_NAME, original)


def img2dataset_download(cfg: Config, source: str, url_list: str, output_folder: str) -> None:
    """One img2dataset run with the config's settings (incremental: completed shards are kept)."""
    d = cfg.download
    distributor = d.distributor
    if distributor == "multiprocessing" and cfg.ray.address:
        distributor = "ray"
    ray_runtime.share_storage_options(cfg)  # img2dataset opens the output folder without our fsspec options
    if distributor == "ray":
        ray_runtime.connect(cfg)
    # its set-up lines, its advice to watch bwm-ng and two lines per shard left out (the stage prints its progress)
    engine = _engine(decoder_for(cfg, source), d.deadline_seconds, d.allow_private_addresses)
    with engine, filtered_output(IMG2DATASET_CHATTER):
        i2d_main.download(
            url_list=url_list,
            output_folder=output_folder,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=ADDITIONAL_COLUMNS,
            output_format="webdataset",
            image_size=d.image_size,
            resize_mode=d.resize_mode,
            resize_only_if_bigger=True,
            encode_format="jpg",
            encode_quality=95,
            processes_count=d.processes,
            thread_count=d.threads,
            number_sample_per_shard=d.samples_per_shard,
            timeout=d.timeout,
            retries=d.retries,
            disallowed_header_directives=d.disallowed_header_directives,
            incremental_mode="incremental",
            distributor=distributor,
            enable_wandb=False,
        )
