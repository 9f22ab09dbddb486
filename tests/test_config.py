"""Config loading, overrides and validation messages; every shipped YAML loads."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

import configs
from pipelines.config import Config, ConfigError, apply_override, dump_config, load_config, resolve_config

CONFIG_DIR = Path(configs.__file__).parent


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert load_config(None).model_dump() == load_config(CONFIG_DIR / "demo.yaml").model_dump()


def test_paper_recipe_values() -> None:
    cfg = load_config(CONFIG_DIR / "paper.yaml")
    names = [s.name for s in cfg.sources]
    assert names == ["laion", "mmc4", "coco", "cc3m", "cc12m", "sbu", "coyo"]
    assert cfg.sources[0].filters.top_k == 100_000_000 and cfg.sources[1].filters.top_k == 20_000_000
    assert cfg.index.source == "cc3m"
    s1, s2 = cfg.train.stage1, cfg.train.stage2
    assert (s1.workers, s1.global_batch_size, s1.epochs) == (32, 1024, 3)
    assert s1.lr == pytest.approx(4e-4)
    assert (s2.workers, s2.global_batch_size, s2.epochs, s2.warmup_epochs) == (8, 32, 4, 1)
    assert s2.lr == pytest.approx(1.25e-4)
    assert (s1.max_words, s2.max_words, s1.weight_decay, s2.weight_decay) == (96, 512, 0.05, 0.02)


def test_overrides_parse_yaml_values_and_reach_list_items_by_name() -> None:
    cfg = load_config(
        None,
        ["download.timeout=7.5", "sources.synthetic.filters.top_k=10", "sources.0.filters.languages=[en, de]"],
    )
    assert cfg.download.timeout == 7.5
    assert cfg.sources[0].filters.top_k == 10
    assert cfg.sources[0].filters.languages == ["en", "de"]


def test_error_names_file_and_dotted_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stage1:\n    blr: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "train.stage1.blr" in msg and "-1" in msg


def test_unknown_keys_and_list_positions_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - name: a\n    format: laion\n    filters: {min_widht: 3}\n")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.filters\.min_widht: Extra inputs"):
        load_config(bad)


def test_override_errors_name_the_override() -> None:
    with pytest.raises(ConfigError, match=r"--set download\.timeout=-2.*download\.timeout"):
        load_config(None, ["download.timeout=-2"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(None, ["download.timeout"])
    with pytest.raises(ConfigError, match="no list item 'nope'"):
        load_config(None, ["sources.nope.format=laion"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("synthetic.host=10.0.0.1", "synthetic.host"),
        ("synthetic.min_side=500", "synthetic"),
        ("train.stage2.warmup_epochs=9", "train.stage2"),
        ("retrain.cron='* *'", "retrain.cron"),
        ("index.max_index_memory=lots", "index.max_index_memory"),
        ("download.resize_mode=border", "download.resize_mode"),
        ("sources.synthetic.filters.max_punsafe=1.5", "sources[0].filters.max_punsafe"),
        ("sources.synthetic.filters.min_similarity=2", "sources[0].filters.min_similarity"),
        ("curate.memory_limit=lots", "curate.memory_limit"),
        ("download.allow_private_addresses=[10.0.0.1/8]", "download.allow_private_addresses"),
        ("download.allow_private_addresses=[intranet]", "download.allow_private_addresses"),
        ("download.allow_private_addresses=sometimes", "download.allow_private_addresses"),
    ],
)
def test_invalid_values_are_refused(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(None, [override])


def test_stage2_conversation_and_its_deprecated_alias() -> None:
    assert Config().train.stage2.conversation == "turns"  # the paper's
    assert load_config(None).train.stage2.conversation == "whole"  # the demo's
    assert load_config(None, ["train.stage2.conversation=first"]).train.stage2.conversation == "first"
    aliased = load_config(None, ["train.stage2.conversation=turns", "train.stage2.first_turn_only=true"])
    assert aliased.train.stage2.conversation == "first"
    assert resolve_config(aliased).train.stage2.conversation == "first"  # a dump of it validates again
    with pytest.raises(ConfigError, match=r"train\.stage2: .*first_turn_only.*conflicts with conversation: whole"):
        load_config(None, ["train.stage2.conversation=whole", "train.stage2.first_turn_only=true"])
    with pytest.raises(ConfigError, match=r"train\.stage2\.conversation"):
        load_config(None, ["train.stage2.conversation=all"])


def test_private_addresses_are_refused_unless_allowed() -> None:
    assert Config().download.allow_private_addresses is False  # the default: public addresses only
    assert load_config(None).download.allow_private_addresses is True  # the demo's server is on loopback
    allowed = load_config(None, ["download.allow_private_addresses=[10.1.0.0/16, '::1', 127.0.0.1]"])
    assert allowed.download.allow_private_addresses == ["10.1.0.0/16", "::1/128", "127.0.0.1/32"]
    with pytest.raises(ConfigError, match="host bits set"):
        load_config(None, ["download.allow_private_addresses=[10.0.0.1/8]"])


def test_duplicate_source_names_refused(tmp_path: Path) -> None:
    bad = tmp_path / "dup.yaml"
    bad.write_text("sources:\n  - {name: a, format: laion}\n  - {name: a, format: coyo}\n")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(bad)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_dump_round_trips() -> None:
    cfg = load_config(CONFIG_DIR / "paper.yaml")
    import yaml

    data = yaml.safe_load(dump_config(cfg))
    assert Config.model_validate(data) == cfg


def test_apply_override_into_new_section() -> None:
    data: dict = {}
    apply_override(data, "ray.address=auto")
    assert data == {"ray": {"address": "auto"}}


def test_resolve_config_from_object_path_or_default(tmp_path: Path) -> None:
    base = load_config(None)
    cfg = resolve_config(base, ["seed=5"])
    assert cfg.seed == 5 and base.seed == 0  # the given object is not changed
    assert resolve_config(str(CONFIG_DIR / "paper.yaml")).index.source == "cc3m"
    assert resolve_config(None) == base
    with pytest.raises(ConfigError, match=r"config with --set seed=x: seed"):
        resolve_config(base, ["seed=x"])


# Settings read inside the config itself, and where: every other one is read by a stage.
READ_BY_THE_CONFIG = {
    "blr": "StageConfig.lr = blr x global_batch_size / 256, which training reads",
    "first_turn_only": "the deprecated alias StageConfig turns into `conversation: first`",
}


def _settings(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, spec in model.model_fields.items():
        sections = [a for a in (*get_args(spec.annotation), spec.annotation) if isinstance(a, type)]
        section = next((a for a in sections if issubclass(a, BaseModel)), None)
        yield from _settings(section, f"{prefix}{name}.") if section else [prefix + name]


def test_every_setting_is_read_by_some_stage() -> None:
    """Each leaf of the config is read outside pipelines/config (as an attribute, a flag's setting or a key)."""
    root = Path(__file__).resolve().parents[1]
    code = "\n".join(
        p.read_text()
        for d in ("pipelines", "flows", "stores")
        for p in (root / d).rglob("*.py")
        if "config" not in p.parts
    )
    names = {dotted: dotted.rsplit(".", 1)[-1] for dotted in _settings(Config)}
    unread = [
        dotted
        for dotted, name in names.items()
        if name not in READ_BY_THE_CONFIG and not re.search(rf"\.{name}\b|[\"']{name}[\"']", code)
    ]
    assert unread == []
    assert "infer.temperature" in list(_settings(Config)) and "train.stage1.blr" in list(_settings(Config))


def test_serve_cache_still_means_the_cache_setting() -> None:
    """An older config's `serve.cache` is `infer.use_cache`, the one cache setting of every command."""
    assert load_config(None, ["serve.cache=true"]).infer.use_cache is True
    assert load_config(None, ["serve.cache=true", "infer.use_cache=false"]).infer.use_cache is False
    assert load_config(None).infer.use_cache is False


def test_a_small_file_layers_over_a_whole_config(tmp_path: Path) -> None:
    """A file that sets a few keys is refused alone (the error says how to layer it), and layers over a whole
    config by `extends:` or by repeating -c; sections merge key by key, later files win."""
    small = tmp_path / "small.yaml"
    small.write_text("train: {stage1: {workers: 2}}\n")
    with pytest.raises(ConfigError, match=r"Field required(.|\n)*begin it with `extends: demo`"):
        load_config(small)
    demo = load_config(None)
    layered = load_config(["demo", small])
    assert layered.train.stage1.workers == 2 and layered.train.stage1.blr == demo.train.stage1.blr
    assert layered.sources == demo.sources
    (tmp_path / "mine.yaml").write_text("extends: demo\ntrain: {stage1: {workers: 2}}\nseed: 7\n")
    (tmp_path / "more.yaml").write_text("extends: mine.yaml\nseed: 8\n")  # a path from the file's folder
    more = load_config(tmp_path / "more.yaml", ["train.stage1.workers=3"])
    assert (more.seed, more.train.stage1.workers, more.model) == (8, 3, demo.model)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="comes back to itself"):
        load_config(tmp_path / "loop.yaml")
