"""Plain configuration: dataclasses in, kebab-case argparse flags out, and back.

Every stage declares a `@dataclass` config. `add_config_args` turns its fields into flags (`device_batch_size` ->
`--device-batch-size`), `config_from_args` builds the dataclass back, and `explicit_overrides` tells which flags the
user actually typed, so later stages can inherit values from a source checkpoint unless overridden.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

class _Unset:
    """Default of every generated flag, to tell "not given" from any real value. Not a string: argparse runs string
    defaults through `type` (int("...") would fail for every int flag left out)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class UserError(Exception):
    """Bad input from the user (a flag, a file, a request). The CLI prints the message alone, no traceback.

    The message names the flag/file/URL, the value, and the way out."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Unwrap Optional[X] -> (X, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field. Help text comes from `field(metadata={"help": ...})`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        helptext = f.metadata.get("help", "")
        helptext = f"{helptext} (default: {default})" if helptext else f"(default: {default})"
        kwargs: dict[str, Any] = dict(default=_UNSET, help=helptext, dest=f.name)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            kwargs["type"] = inner
            kwargs["nargs"] = "+"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif tp is Path:
            kwargs["type"] = Path
        else:
            kwargs["type"] = str
        parser.add_argument(flag_name(f.name), **kwargs)


def explicit_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not _UNSET and v != _UNSET}


def config_from_args(cls: type[T], args: argparse.Namespace, **base: Any) -> T:
    """Build `cls` from defaults, then `base` (e.g. preset values), then explicit flags (which win)."""
    values = dict(base)
    values.update(explicit_overrides(args, cls))
    for k, v in list(values.items()):
        if isinstance(v, list):
            values[k] = v if typing.get_origin(typing.get_type_hints(cls)[k]) is list else tuple(v)
    cfg = cls(**values)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-friendly dict of a dataclass (Paths become strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: type[T], d: dict[str, Any], strict: bool = False) -> T:
    """Rebuild a dataclass from `to_dict` output; unknown keys are ignored unless strict (old checkpoints)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if strict and unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        if k not in names:
            continue
        tp, _ = _base_type(hints[k])
        if tp is Path and v is not None:
            v = Path(v)
        elif typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (used to detect changed stage inputs)."""
    import hashlib

    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def require(cond: bool, message: str) -> None:
    """Validation helper: raise ConfigError(message) when cond is false. Messages should print the values."""
    if not cond:
        raise ConfigError(message)


# Validation helpers: each raises ConfigError with one line that names the flag or file, the value, and the way out.


def check_ranges(cfg: Any, bounds: dict[str, tuple[float | None, float | None]], hints: dict[str, str] | None = None
                 ) -> None:
    """Every float field of the dataclass `cfg` must be finite (argparse takes 'nan' and 'inf' as floats), and each
    field named in `bounds` must lie in [low, high] (None: unbounded on that side). The message repeats the field's
    help text, which says what the special values (0, -1) mean."""
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cfg)}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{flag_name(f.name)} {v}: must be a finite number")
    for name, (low, high) in bounds.items():
        v = getattr(cfg, name)
        if v is None or isinstance(v, bool):
            continue
        if (low is not None and v < low) or (high is not None and v > high):
            want = (f"in [{low}, {high}]" if low is not None and high is not None
                    else f">= {low}" if low is not None else f"<= {high}")
            note = (hints or {}).get(name) or helps.get(name, "")
            raise ConfigError(f"{flag_name(name)} {v}: must be {want}" + (f" ({note})" if note else ""))


def check_run_name(run: str, flag: str = "--run") -> str:
    """A run name becomes one folder under PICOCHAT_HOME/runs: no separators, no leading dot, no control
    characters, so no name can point outside that folder."""
    if (not run or len(run) > 128 or run.startswith(".") or any(c in run for c in "/\\")
            or any(ord(c) < 32 for c in run)):
        raise ConfigError(f"{flag} {run!r}: a run name is a plain folder name such as 'tiny' or 'd20' (no '/' or "
                          f"'\\', no leading '.', at most 128 characters)")
    return run


def require_dir(path: str | Path, flag: str, hint: str = "", must_exist: bool = True) -> Path:
    """`path` (given with `flag`) is an existing directory, or (must_exist=False) nothing yet or a directory."""
    p = Path(path).expanduser()
    way = f"; {hint}" if hint else ""
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p}: is a file, expected a directory{way}")
    if must_exist and not p.exists():
        raise ConfigError(f"{flag} {p}: no such directory{way}")
    return p


def require_checkpoint_dir(path: str | Path, flag: str = "--checkpoint") -> Path:
    """A directory holding meta.json (a training checkpoint, runs/<run>/<stage>/checkpoints/step_N, or an exported
    model folder) or config.json (a Hugging Face folder)."""
    hint = ("pass a checkpoint directory such as PICOCHAT_HOME/runs/<run>/sft/checkpoints/step_000100 or an "
            "exported model folder, or drop --checkpoint to use the latest of --run")
    p = require_dir(path, flag, hint)
    if not (p / "meta.json").is_file() and not (p / "config.json").is_file():  # config.json: a Hugging Face folder
        raise ConfigError(f"{flag} {p}: no meta.json (or config.json) there, so not a picochat checkpoint; {hint}")
    return p
