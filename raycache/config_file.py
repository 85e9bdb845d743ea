"""Reading an experiment config: a YAML file plus dotted `key=value` overrides, validated on load into
`raycache.config.ExperimentConfig`. Unknown keys, wrong types and out-of-range values raise `UserError`
with one line naming the dotted key (the closest known key suggested for a typo).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raycache.config import ExperimentConfig, known_keys
from raycache.errors import UserError
from raycache.models.clip import LOCAL_DIR, WEIGHT_SUFFIXES


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; read it as the float every user means (as YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value). Numbers, null, booleans and lists parse as YAML does."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected key=value, e.g. --set data.alpha=0.1")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if not loc:  # a cross-field check: its message names the keys
        return e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, known_keys(ExperimentConfig), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{loc}: unknown config key{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if msg.startswith(f"{loc}."):  # a section's cross-field check names its own key
        return msg
    if e["type"].startswith("value_error") or "input" not in e:
        return f"{loc}: {msg}"
    return f"{loc}: {msg} (got {e['input']!r})"


PER_METHOD = "per_method"


def with_per_method(tree: dict[str, Any]) -> dict[str, Any]:
    """An experiment may hold settings for several methods, `per_method: {<method>: {<key>: value}}` (e.g. a
    sweep's base, where `method.name` varies): the chosen method's entry fills its `method` section (keys set
    there win); every entry must name a method and that method's own keys."""
    from raycache.config import method_settings
    from raycache.methods import method_names

    if PER_METHOD not in tree:
        return tree
    tree = dict(tree)
    per = tree.pop(PER_METHOD)
    if not isinstance(per, dict):
        raise UserError(f"config error: {PER_METHOD}: expected a mapping of method name to its settings")
    for name, settings in per.items():
        if name not in method_names():
            raise UserError(f"config error: {PER_METHOD}.{name}: unknown method; choose one of: "
                            f"{', '.join(method_names())}")
        if not isinstance(settings, dict):
            raise UserError(f"config error: {PER_METHOD}.{name}: expected a mapping of settings")
        try:  # each entry is its method's settings, checked as a method section is
            method_settings({**settings, "name": name})
        except ValueError as err:
            raise UserError(f"config error: {PER_METHOD}.{name}.{str(err).removeprefix('method.')}") from None
    method = tree.get("method") or {}
    if not isinstance(method, dict):
        return tree
    chosen = method.get("name", "cachefl")
    tree["method"] = {**per.get(chosen, {}), **method}
    return tree


def build_config(tree: dict[str, Any]) -> ExperimentConfig:
    tree = with_per_method(tree)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"config error: {_one_line(err)}") from None


def read_yaml_file(path: str | Path, expected: str = "a mapping of config sections") -> dict[str, Any]:
    """A YAML file that must hold a mapping (or nothing); a missing file or a YAML error is one line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        loaded = read_yaml(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}: not valid YAML{where}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"{p}: expected {expected}, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML experiment (or the defaults when `path` is None) and apply `key=value` overrides."""
    tree: dict[str, Any] = {} if path is None else read_yaml_file(path)
    for item in overrides:
        apply_override(tree, *parse_override(item))
    return build_config(tree)


# Keys whose value may be a local path (some also take a hub id, a tag or a built-in name): paths are
# relative to the working directory of the command that reads the config.
PATH_KEYS = ("data.dataset", "data.split_file", "data.class_names", "model.pretrained", "synth.generator",
             "synth.out", "runtime.cache_dir")


def absolute_path(key: str, value: Any) -> Any:
    """`value` of `key` (one of PATH_KEYS) made absolute against the current directory where it is a local
    path: an existing file or folder, or any string for `synth.out` and `runtime.cache_dir` (always paths,
    perhaps not made yet). Anything else (a hub id, a pretrained tag, a built-in dataset) is returned as is."""
    if key not in PATH_KEYS or not isinstance(value, str):
        return value
    if key == "data.dataset":
        from raycache.data.sources import BUILTINS

        if value in BUILTINS:  # a built-in name, even where a folder of that name exists
            return value
    if key == "model.pretrained" and not (value.startswith(LOCAL_DIR) or os.sep in value or
                                          Path(value).suffix in WEIGHT_SUFFIXES):
        return value  # a pretrained tag (check_spec reads the value the same way)
    prefix = LOCAL_DIR if value.startswith(LOCAL_DIR) else ""
    path = Path(value.removeprefix(prefix)).expanduser()
    if key in ("synth.out", "runtime.cache_dir") or path.exists():
        return prefix + str(path.resolve())
    return value


def absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """The tree with every relative local path made absolute (`absolute_path`), for a process that runs
    elsewhere: a sweep's trial runs in its own working directory."""
    tree = copy.deepcopy(tree)
    runtime = tree.setdefault("runtime", {})
    if isinstance(runtime, dict):  # the default cache folder too (anything else: build_config names it)
        runtime.setdefault("cache_dir", ExperimentConfig().runtime.cache_dir)
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = tree.get(section)
        if isinstance(node, dict) and name in node:
            node[name] = absolute_path(key, node[name])
    return tree


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
