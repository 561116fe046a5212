"""One run's configuration, in one visible place: the layers' own settings, composed.

    config = RunConfig()                                  # every default
    config = load_config(Path("run.toml"))                # a file: only what it sets changes
    config.train.learning_rate = 1e-4                     # or in code
    write_config(config, run_dir / "config.toml")         # what a run ran with, beside its results

A field is declared once, in its layer's dataclass (`Fields` in data/loaders.py, `TrainSettings` in lm/training.py,
`EngineSettings` in lm/engine.py, `VllmOptions` in lm/serving.py, `LoopSettings` in
optimize/settings.py); the command line's options are mapped onto these fields in one table,
`misstep.options.OPTIONS`.

A TOML file has one table per section, with the fields it changes:

    model = "smollm2-135m-instruct"
    serving = "embedded"

    [train]
    method = "full"
    learning_rate = 1e-4

    [loop]
    rounds = 5
    error_types = ["arithmetic_slip", "wrong_operand"]

    [loop.stop]
    patience = 3

    [arms.judge-curriculum]   # one arm of a side-by-side run (`misstep optimize --arm`), unlike [loop]
    rounds = 4
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from misstep.data.loaders import Fields
from misstep.lm.engine import EngineSettings
from misstep.lm.models import DEFAULT_MODEL
from misstep.lm.provider import SERVINGS
from misstep.lm.serving import VllmOptions
from misstep.lm.training import TrainSettings
from misstep.optimize.settings import LoopSettings, arm_parts


@dataclass
class RunConfig:
    """Everything a run is configured by."""

    model: str = DEFAULT_MODEL  # a registered model's name, or a local Hugging Face model folder
    serving: str = "embedded"  # "embedded" (in this process) or "vllm" (a local vLLM server per checkpoint)
    data: Fields = field(default_factory=Fields)  # which field of a data file's records holds what
    train: TrainSettings = field(default_factory=TrainSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    vllm: VllmOptions = field(default_factory=VllmOptions)
    loop: LoopSettings = field(default_factory=LoopSettings)
    # What one arm of a side-by-side run does differently from [loop], by the arm's name
    # ([arms.judge-curriculum] with rounds = 4): a table of LoopSettings fields, applied to the arm
    # after [loop] and the command line's loop options.
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.serving not in SERVINGS:
            raise ValueError(f"serving must be one of {SERVINGS}, not {self.serving!r}")
        for name, changes in self.arms.items():  # checked here, so a bad table fails naming its file and key
            arm_parts(name)
            if not isinstance(changes, dict):
                raise ConfigError(f"arms.{name} is a section ([arms.{name}]), not a value")
            apply(self.loop, changes, f"arms.{name}.")


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the file and the key."""


def config_dict(config: Any) -> dict[str, Any]:
    """A settings dataclass as plain data (nested sections as dicts; tuples as lists)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return config_dict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_config(config: RunConfig, path: Path) -> None:
    """`config` as TOML. TOML has no null: a field that is None is left out, and reads back as its
    default, so only fields whose default is None may be None (checked here, not found out later)."""
    text = tomli_w.dumps(_without_none(config_dict(config), config, ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _without_none(data: dict[str, Any], settings: Any, where: str) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(settings):
        value = data[f.name]
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(settings, f.name)):
            out[f.name] = _without_none(value, getattr(settings, f.name), f"{where}{f.name}.")
        elif value is not None:
            out[f.name] = value
        elif _default(f) is not None:
            raise ConfigError(f"{where}{f.name} is None, which a TOML file cannot say: its default is {_default(f)!r}")
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def load_config(path: Path, base: RunConfig | None = None) -> RunConfig:
    """A TOML file's settings on top of `base` (default: every default). An unknown key, or a
    value of the wrong type, is an error that names the file and the key."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a TOML file ({exc})") from None
    try:
        return apply(base or RunConfig(), data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply(settings: Any, changes: dict[str, Any], where: str) -> Any:
    """A copy of the dataclass `settings` with `changes` (nested dicts for nested sections) made,
    each value checked against its field's type."""
    known = {f.name: f for f in dataclasses.fields(settings)}
    hints = typing.get_type_hints(type(settings))
    updated = {}
    for name, value in changes.items():
        if name not in known:
            raise ConfigError(f"unknown key {where}{name}; known: {', '.join(sorted(known))}")
        current = getattr(settings, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name} is a section ([{where}{name}]), not a value")
            updated[name] = apply(current, value, f"{where}{name}.")
        else:
            updated[name] = _checked(value, hints[name], f"{where}{name}")
    try:
        return dataclasses.replace(settings, **updated)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where.rstrip('.')}: {exc}" if where else str(exc)) from None


def _checked(value: Any, hint: Any, key: str) -> Any:
    """`value` as the field's type wants it (an int where a float goes, a list where a tuple does)."""
    allowed = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin in (list, tuple) and isinstance(value, list):
            return origin(value)
        if origin is Path and isinstance(value, str):
            return Path(value)
        if isinstance(origin, type) and isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"{key} must be {_describe(hint)}, not {value!r}")


def _describe(hint: Any) -> str:
    return " or ".join(
        getattr(k, "__name__", str(k)) for k in (typing.get_args(hint) or (hint,)) if k is not type(None)
    )
