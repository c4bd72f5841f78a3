"""YAML + `key=value` overrides -> a validated `RunConfig`, with every problem reported at once."""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from prefalign.config.args import (
    DataArguments,
    ExportArguments,
    FinetuningArguments,
    GenerationArguments,
    ModelArguments,
    RunConfig,
)
from prefalign.config import lf_keys, scale
from prefalign.config.checks import cross_group_problems
from prefalign.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

_GROUPS = (ModelArguments, DataArguments, FinetuningArguments, ExportArguments, GenerationArguments)

class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so `save_strategy: no` stays "no"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path | None, overrides: list[str] = (), command: str = "train") -> RunConfig:
    """Read `path` (YAML), apply `key=value` overrides, and return a `RunConfig` validated for `command`."""
    return build_config(read_values(path, overrides), command)


def read_values(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The flat key/values of `path` (YAML) with `key=value` overrides applied, not yet checked (imports no model library)."""
    values: dict[str, Any] = _read_yaml(path) if path is not None else {}
    values.update(parse_overrides(overrides))
    return values


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["pref_beta=0.05", "dataset=a,b"]` -> {"pref_beta": 0.05, "dataset": "a,b"}; values are YAML scalars."""
    parsed: dict[str, Any] = {}
    bad = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"override {item!r}: expected key=value, e.g. pref_beta=0.05")
            continue
        try:
            parsed[key.strip()] = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    if bad:
        raise ConfigError(bad)
    return parsed


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _model_max_length(cutoff_len: int, command: str, *, cutoff_given: bool) -> int | None:
    """An unset model_max_length, as LLaMA-Factory 0.9.5 sets it (hparams/parser.py): `cutoff_len` in training;
    at inference (chat, eval) unset, so rope_scaling scales by 2 (model_utils/rope.py); export takes a
    cutoff_len the config gives. A saved run_config.yaml carries training's value, so it is never unset there."""
    if command not in INFERENCE_COMMANDS or (command == "export" and cutoff_given):
        return cutoff_len
    return None


def _training_fields() -> dict[str, dataclasses.Field]:
    from transformers import Seq2SeqTrainingArguments

    return {f.name: f for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}


INFERENCE_COMMANDS = ("chat", "eval", "export")


def build_config(values: dict[str, Any], command: str = "train") -> RunConfig:
    """Map flat key/values to the typed groups; collect unknown keys, bad types and conflicts together.
    `command`: the prefalign command the config is for (the model_max_length rule differs at inference)."""
    problems: list[str] = []
    values = dict(values)
    training_fields = _training_fields()

    values, lf_problems, notes = lf_keys.translate(values)  # every LLaMA-Factory key has its answer there
    problems += lf_problems
    for note in notes:
        logger.info("config: %s", note)

    group_fields = {cls: {f.name: f for f in dataclasses.fields(cls)} for cls in _GROUPS}
    known = set(training_fields).union(*[set(f) for f in group_fields.values()], lf_keys.LF_KEYS)
    group_values: dict[type, dict[str, Any]] = {cls: {} for cls in _GROUPS}
    train_values: dict[str, Any] = {}
    for key, value in values.items():
        owner = next((cls for cls in _GROUPS if key in group_fields[cls]), None)
        if owner is None and key not in training_fields:
            hint = did_you_mean(key, sorted(known))
            problems.append(f"unknown key {key!r}" + (f"; {hint}" if hint else ""))
            continue
        hints = typing.get_type_hints(owner) if owner else {key: training_fields[key].type}
        try:
            value = coerce(value, hints[key])
        except (TypeError, ValueError) as exc:
            problems.append(f"{key}: {exc}")
            continue
        (group_values[owner] if owner else train_values)[key] = value

    model = ModelArguments(**group_values[ModelArguments])
    data = DataArguments(**group_values[DataArguments])
    finetuning = FinetuningArguments(**group_values[FinetuningArguments])
    export = ExportArguments(**group_values[ExportArguments])
    generation = GenerationArguments(**group_values[GenerationArguments])
    if model.model_max_length is None:
        model.model_max_length = _model_max_length(data.cutoff_len, command, cutoff_given="cutoff_len" in values)
    train_values.setdefault("output_dir", "saves/prefalign-run")
    for group in (model, data, finetuning, export, generation):
        problems += group.problems()
    problems += cross_group_problems(model, data, finetuning, train_values, command)

    training = None
    train_values["remove_unused_columns"] = False  # our collator reads the encoded pair columns
    train_values.setdefault("report_to", "none")
    train_values.setdefault("do_train", True)
    train_values.setdefault("dataloader_pin_memory", _cuda_available())  # pinning needs an accelerator
    if not problems and train_values.get("deepspeed"):
        train_values["deepspeed"] = scale.resolved_deepspeed(train_values["deepspeed"])
    if not problems:
        from transformers import Seq2SeqTrainingArguments

        from prefalign.distributed import cpu_launch_arguments

        try:
            training = Seq2SeqTrainingArguments(**cpu_launch_arguments(train_values))
            # Every process collates its own pairs. accelerate's default for a stream (`streaming`) is
            # to collate on the main process and dispatch: it slices every tensor of a batch to the
            # first tensor's row count, which cuts a packed batch (one row of B pairs) down to its
            # first span and first pair's index, so the rest of the row attends nowhere.
            training.accelerator_config.dispatch_batches = False
        except (ValueError, ImportError, TypeError) as exc:
            problems.append(f"training arguments: {str(exc).splitlines()[0]}")
    if problems:
        raise ConfigError(problems)
    # The resolved config: every prefalign key with its value or default, and the training keys given.
    resolved = {}
    for group in (model, data, finetuning, export, generation):
        resolved.update(dataclasses.asdict(group))
    resolved.update(train_values)
    return RunConfig(model, data, finetuning, training, resolved, export, generation)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, annotation: Any) -> Any:
    """Convert a YAML value to a field's annotated type; raise ValueError with a readable message."""
    if value is None:
        return None
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # X | None: X's own message
            return coerce(value, candidates[0])
        for candidate in candidates:
            try:
                return coerce(value, candidate)
            except (TypeError, ValueError):
                continue
        names = " or ".join(getattr(c, "__name__", str(c)) for c in candidates)
        raise ValueError(f"expected {names}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE:
            return True
        if str(value).strip().lower() in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    origin = typing.get_origin(annotation)
    if origin is list and args and args[0] in (str, float, int):
        # a list-valued key: a YAML list or a comma-separated string in, a list of the element type out
        items = value if isinstance(value, (list, tuple)) else (str(value).split(",") if isinstance(value, str)
                                                                  else [value])
        items = [item.strip() if isinstance(item, str) else item for item in items]
        kind = {str: "strings", float: "numbers", int: "integers"}[args[0]]
        try:
            return [coerce(item, args[0]) for item in items if item != ""]
        except ValueError:
            raise ValueError(f"expected a list (or comma-separated string) of {kind}, got {value!r}") from None
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        return [v.strip() for v in str(value).split(",")] if isinstance(value, str) else [value]
    if origin is dict and not isinstance(value, (dict, str)):
        raise ValueError(f"expected a mapping, got {value!r}")
    return value  # enums and anything else: the dataclass validates it
