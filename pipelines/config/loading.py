"""Reading a configuration: YAML files (packaged ones by name), dotted overrides, validation naming the field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.config.base import DEMO_CONFIG
from pipelines.config.root import Config


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the dotted field path."""


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `origin: dotted.path: message (got value)`."""
    lines = []
    for e in err.errors():
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"{origin}: {_dotted(e['loc'])}: {e['msg']}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


LAYERING = (
    "a file that sets only some keys layers over a whole one: begin it with `extends: demo` (a packaged config's "
    "name, or a path from the file's folder), or give both, `-c demo -c FILE`"
)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`: sections merge key by key, any other value (lists included) replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def _read_layered(path: str | Path | None, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """A config file with what its `extends:` names beneath it (recursively), and where it came from."""
    data, origin = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, origin
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{origin}: extends: a packaged config's name or a file's path, got {parent!r}")
    if origin in seen:
        raise ConfigError(f"{origin}: extends {parent!r} comes back to itself ({' -> '.join(seen)})")
    beside = Path(path).parent / parent if path is not None else None
    base, base_origin = _read_layered(beside if beside is not None and beside.is_file() else parent, (*seen, origin))
    return merged(base, data), f"{origin} over {base_origin}"


def _read_yaml(path: str | Path | None) -> tuple[dict[str, Any], str]:
    if path is None:
        text = resources.files("configs").joinpath(DEMO_CONFIG).read_text()
        origin = f"configs/{DEMO_CONFIG} (packaged default)"
    else:
        text, origin = _find_config(Path(path))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    return data, origin


def packaged_configs() -> list[str]:
    """Names of the configurations shipped with ibllm (`-c paper` takes configs/paper.yaml from anywhere)."""
    return sorted(
        f.name.removesuffix(".yaml") for f in resources.files("configs").iterdir() if f.name.endswith(".yaml")
    )


def _find_config(path: Path) -> tuple[str, str]:
    """A config file by path, else a packaged one by name (`paper`, `paper.yaml` or `configs/paper.yaml`)."""
    if path.is_file():
        return path.read_text(), str(path)
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if (len(path.parts) == 1 or path.parent.name == "configs") and name in packaged_configs():
        return resources.files("configs").joinpath(f"{name}.yaml").read_text(), f"configs/{name}.yaml (packaged)"
    raise ConfigError(
        f"{path}: config file not found (looked for {path.absolute()}, and among the packaged "
        f"configs: {', '.join(packaged_configs())})"
    )


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in nested data; the value is parsed as YAML; list items by index or by `name`."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    set_value(data, key.strip(), yaml.safe_load(raw), f"--set {override!r}")


def set_value(data: dict[str, Any], dotted: str, value: Any, what: str | None = None) -> None:
    """Set the setting `a.b.c` in nested data to `value` as it is; list items by index or by `name`."""
    what = what or dotted
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, what)
            if last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{what}: {where} is a value, not a section")


def with_settings(cfg: Config, settings: Mapping[str, Any], origin: str = "") -> Config:
    """A validated copy of `cfg` with each dotted setting set to its value (typed, not YAML): how a command-line
    flag or a caller's run control reaches a stage. ConfigError names the setting (and `origin`, e.g. the flags)."""
    if not settings:
        return cfg
    data = cfg.model_dump(mode="json")
    for dotted, value in settings.items():
        set_value(data, dotted, value)
    given = origin or ", ".join(f"{k}={v!r}" for k, v in settings.items())
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"with {given}")) from None


def _list_index(items: list[Any], part: str, override: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(f"{override}: no list item {part!r} (use an index or an item's name)")


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; raise ConfigError naming the file and field on any problem.

    `path` is a file or a packaged config's name (None: the packaged demo config), or several of them laid one over
    the next (`-c demo -c mine.yaml`); a file's `extends:` puts the config it names beneath it.
    """
    layers = [path] if path is None or isinstance(path, str | Path) else list(path) or [None]
    data, origins = {}, []
    for layer in layers:
        more, origin = _read_layered(layer)
        data, origins = merged(data, more), [*origins, origin]
    return _validate(data, " + ".join(origins), overrides)


def resolve_config(config: Config | str | Path | None, overrides: list[str] | None = None) -> Config:
    """A config given as an object, a YAML path, or None (the packaged demo config), with overrides applied."""
    if isinstance(config, Config):
        return _validate(config.model_dump(mode="json"), "config", overrides)
    return load_config(config, overrides)


def _validate(data: dict[str, Any], origin: str, overrides: list[str] | None) -> Config:
    for override in overrides or []:
        apply_override(data, override)
    if overrides:
        origin = f"{origin} with --set {' --set '.join(overrides)}"
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        message = format_validation_error(e, origin)
        partial = any(err["type"] == "missing" for err in e.errors())
        raise ConfigError(message + (f"\n  ({LAYERING})" if partial else "")) from None
