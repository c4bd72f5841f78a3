"""Where preference records come from: local files (JSON, JSONL, Parquet, CSV) and directories of
them, LLaMA-Factory `dataset_info.json` registries, and hub datasets via `datasets.load_dataset`.

`load_preference_pairs` is the entry point: names → records → `PreferencePair`s (data/formats.py)
→ per-dataset sampling → one mixed list, with a `DataReport` of what was kept and skipped.

JSON and JSONL are parsed here rather than by `datasets`, so that a broken file is reported by line
and column and every record by its position (and line).
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefalign.contracts import PreferencePair, RecordSource
from prefalign.data.formats import (
    WHOLE_RECORD,
    RecordError,
    RecordFormat,
    detect_format,
    hint_in_parentheses,
    format_from_registry,
    to_example,
    to_pair,
)
from prefalign.data.feedback import unpair
from prefalign.data.media import MediaReader, with_media
from prefalign.errors import ConfigError, DataError

REGISTRY_FILE = "dataset_info.json"
SKIP_HINT = "fix the record, or set on_bad_record: skip to leave out such records"


@dataclass
class DataReport:
    """What was loaded, per dataset name: printed at training start and saved to output_dir.

    `loaded`: pairs kept; `skipped`: records left out as bad (on_bad_record: skip); `rejects`: one
    entry per skipped record ({"dataset", "file", "index", "line", "stage", "field", "reason", "record"});
    `used`: pairs each dataset contributes after mixing (differs from `loaded` when interleaving).
    `split_pairs`: with `unpaired`, the preference pairs of each paired dataset split into two KTO examples.
    """

    loaded: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)
    split_pairs: dict[str, int] = field(default_factory=dict)


def load_preference_pairs(
    datasets: list[str],
    dataset_dir: str,
    *,
    max_samples: int | None = None,
    on_bad_record: str = "error",
    mix_strategy: str = "concat",
    interleave_probs: list[float] | None = None,
    seed: int = 42,
    unpaired: bool = False,
    media_dir: str | None = None,
) -> tuple[list[PreferencePair], DataReport]:
    """Read each named dataset, convert its records, and mix them into one list of pairs.

    A name is, in this order: an entry of `<dataset_dir>/dataset_info.json`; a local file or
    directory (absolute, relative to the working directory, or relative to `dataset_dir`); a hub
    dataset (only when there is no dataset_info.json). `max_samples` keeps each dataset's first N
    records (after a registry's `num_samples`). Relative media paths are looked up in `media_dir`
    (default `dataset_dir`, as LLaMA-Factory; data/media.py). Raises `DataError` for unusable data, `ConfigError`
    for bad arguments.
    """
    names = [name.strip() for name in datasets]
    _check_options(names, max_samples, on_bad_record, mix_strategy, interleave_probs)
    registry = Registry.load(dataset_dir)
    report = DataReport()
    per_dataset = []
    for name in names:
        spec = resolve_dataset(name, dataset_dir, registry)
        records, fmt = read_dataset(spec)
        if fmt.unpaired and not unpaired:
            raise DataError(f"{spec.where}: holds unpaired records (one reply with a label, KTO data), not "
                            "preference pairs; train on it with stage: kto")
        records = sample_records(records, spec.num_samples, max_samples, seed, name)
        media = MediaReader(dataset_dir if media_dir is None else media_dir, local=not spec.hub)
        converted = convert_records(records, fmt, spec, on_bad_record, report, media)
        if unpaired and not fmt.unpaired:
            report.split_pairs[name] = len(converted)
            converted = unpair(converted)
        per_dataset.append(converted)
    pairs = mix(per_dataset, mix_strategy, interleave_probs, seed)
    for name in names:
        report.used[name] = 0
    for pair in pairs:
        report.used[pair.source.dataset] += 1
    return pairs, report


def _check_options(names: list[str], max_samples: int | None, on_bad_record: str, mix_strategy: str,
                   interleave_probs: list[float] | None) -> None:
    """The options' rules are `DataArguments.problems()`'s (one place); called directly, they are checked too."""
    from prefalign.config.args import DataArguments

    problems = [] if names else [f"dataset: expected comma-separated dataset names, got {names!r}"]
    problems += DataArguments(dataset=names, max_samples=max_samples, on_bad_record=on_bad_record,
                             mix_strategy=mix_strategy, interleave_probs=interleave_probs).problems()
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------
# Resolving a name: registry entry, local path, or hub dataset


@dataclass
class DatasetSpec:
    """One dataset to read, resolved from its name. `where` names it in messages."""

    name: str
    location: str  # a file, a directory, or a hub dataset name
    hub: bool
    where: str
    format: RecordFormat | None = None  # None: detect from the columns
    split: str = "train"
    subset: str | None = None
    data_dir: str | None = None
    revision: str | None = None
    num_samples: int | None = None


REGISTRY_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url",
                 "cloud_file_name", "formatting", "ranking", "subset", "split", "folder",
                 "num_samples", "columns", "tags", "revision")


@dataclass
class Registry:
    """A LLaMA-Factory `dataset_info.json`: dataset name → entry."""

    path: str
    entries: dict[str, Any]

    @classmethod
    def load(cls, dataset_dir: str) -> "Registry | None":
        path = os.path.join(dataset_dir, REGISTRY_FILE)
        if not os.path.isfile(path):
            return None
        text = _decode(Path(path).read_bytes(), path)
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise _json_error(path, err) from None
        if not isinstance(entries, dict):
            raise DataError(f"{path}: expected an object mapping dataset names to entries, found "
                            f"{type(entries).__name__}")
        return cls(path, entries)

    def spec(self, name: str, dataset_dir: str) -> DatasetSpec:
        """The entry `name` as a DatasetSpec, checked."""
        entry = self.entries[name]
        where = f"dataset '{name}' in {self.path}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, found {type(entry).__name__}")
        for key in entry:
            if key not in REGISTRY_KEYS:
                raise DataError(f"{where}: unknown key \"{key}\"{hint_in_parentheses(key, REGISTRY_KEYS)}")
        kto = isinstance(entry.get("columns"), dict) and bool(entry["columns"].get("kto_tag"))
        if kto and entry.get("ranking", False) is not False:
            raise DataError(f"{where}: \"ranking\" is true but \"columns\" names a \"kto_tag\": a KTO dataset "
                            "holds one labelled reply per record; set \"ranking\": false (or remove it)")
        if not kto and entry.get("ranking", False) is not True:
            raise DataError(f"{where} is not a preference dataset: add \"ranking\": true to its entry "
                            "if its records hold chosen and rejected replies, or name the label column of "
                            "KTO data (one reply with a thumbs-up or down) in \"columns\": {\"kto_tag\": ...}")
        fmt = format_from_registry(entry.get("formatting", "alpaca"), entry.get("columns"),
                                   entry.get("tags"), where)
        num_samples = entry.get("num_samples")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                        or num_samples < 1):
            raise DataError(f"{where}: \"num_samples\" is {num_samples!r}; expected a positive integer")
        options = dict(format=fmt, split=entry.get("split", "train"), subset=entry.get("subset"),
                       data_dir=entry.get("folder"), revision=entry.get("revision"),
                       num_samples=num_samples)
        # hf_hub_url first; ms_hub_url only when there is no hf_hub_url (the names usually agree).
        hub_name = entry.get("hf_hub_url") or entry.get("ms_hub_url")
        if hub_name:
            return DatasetSpec(name, hub_name, True, where, **options)
        if "file_name" not in entry:
            raise DataError(f"{where}: no \"file_name\" or \"hf_hub_url\"; prefalign reads local files "
                            "and hub datasets: download the data and set \"file_name\"")
        path = os.path.join(dataset_dir, entry["file_name"])
        if not os.path.exists(path):
            raise DataError(f"{where}: \"file_name\" {entry['file_name']!r} not found (looked for {path})")
        return DatasetSpec(name, path, False, where, **options)

    def unknown(self, name: str, looked_at: list[str]) -> DataError:
        names = sorted(self.entries)
        listed = ", ".join(names[:30]) + (f", and {len(names) - 30} more" if len(names) > 30 else "")
        return DataError(f"dataset '{name}' is not registered in {self.path}{hint_in_parentheses(name, names)} "
                         f"and is not a file or directory (looked at {', '.join(looked_at)}); "
                         f"registered: {listed or 'none'}. To use a hub dataset, add an entry with "
                         "\"hf_hub_url\"")


def resolve_dataset(name: str, dataset_dir: str, registry: Registry | None) -> DatasetSpec:
    """A registry entry, else a local path, else (with no registry) a hub dataset name."""
    if registry is not None and name in registry.entries:
        return registry.spec(name, dataset_dir)
    path = os.path.expanduser(name)
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(dataset_dir, path)]
    for candidate in candidates:
        if os.path.exists(candidate):
            return DatasetSpec(name, candidate, False, candidate)
    if registry is not None:
        raise registry.unknown(name, candidates)
    if Path(name).suffix.lower() in READERS or name.startswith((".", "/", "~")):
        raise DataError(f"dataset '{name}': no such file or directory (looked at {', '.join(candidates)})")
    return DatasetSpec(name, name, True, f"hub dataset '{name}'")


# ---------------------------------------------------------------------------------------------
# Reading records


@dataclass
class RawRecord:
    """One record as read, before conversion: its parsed value, or the error that kept it from
    parsing (a JSONL line that is not JSON), with the text shown in the rejects file."""

    source: RecordSource
    value: Any = None
    error: RecordError | None = None
    text: str | None = None


def read_dataset(spec: DatasetSpec) -> tuple[list[RawRecord], RecordFormat]:
    """All records of a dataset, and the format to read them with (detected if not registered)."""
    if spec.hub:
        records, first_file = _read_hub(spec), spec.location
    else:
        files = _data_files(spec.location)
        records = [record for path in files for record in _read_file(path, spec.name)]
        first_file = files[0]
    if not records:
        raise DataError(f"{spec.where}: holds no records")
    fmt = spec.format or detect_format((r.value for r in records if r.error is None), first_file)
    return records, fmt


def _data_files(location: str) -> list[str]:
    """A file, or a directory's data files sorted by name (one format; other files are ignored)."""
    if not os.path.isdir(location):
        if Path(location).suffix.lower() not in READERS:
            raise DataError(f"{location}: unknown file type; expected one of {', '.join(READERS)}")
        return [location]
    files = sorted(
        os.path.join(location, name) for name in os.listdir(location)
        if Path(name).suffix.lower() in READERS and not name.startswith(".") and name != REGISTRY_FILE
        and os.path.isfile(os.path.join(location, name))
    )
    if not files:
        raise DataError(f"{location}: a directory with no data files ({', '.join(READERS)})")
    kinds = sorted({Path(path).suffix.lower() for path in files})
    if len(kinds) > 1:
        raise DataError(f"{location}: holds files of several types ({', '.join(kinds)}); a dataset "
                        "directory holds one type: move the others out or register them separately")
    return files


def _read_file(path: str, dataset: str) -> list[RawRecord]:
    return READERS[Path(path).suffix.lower()](path, dataset)


def _read_json(path: str, dataset: str) -> list[RawRecord]:
    """A JSON array of records. A `.json` file holding one object per line is read as JSON Lines
    (as `datasets` does)."""
    data = Path(path).read_bytes()
    text = _decode(data, path)
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":
                return _read_jsonl(path, dataset)
            raise _json_error(path, err) from None
        raise DataError(f"{path}: expected a JSON array of records, found one object with fields "
                        f"{list(value)[:8]}; wrap the records in [...] or write one per line (.jsonl)")
    return [RawRecord(RecordSource(path, index, line, dataset), value)
            for index, (line, value) in enumerate(_json_array(text, path))]


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_array(text: str, path: str) -> list[tuple[int, Any]]:
    """The elements of a JSON array, each with the 1-based line it starts on."""
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        return _WHITESPACE.match(text, pos).end()

    pos = skip(0)
    if pos == len(text):
        return []
    if text[pos] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise _json_error(path, err) from None
        raise DataError(f"{path}: expected a JSON array of records, found {type(value).__name__}")
    items: list[tuple[int, Any]] = []
    line, counted = 1, 0
    pos = skip(pos + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise _json_error(path, err) from None
            line += text.count("\n", counted, pos)
            counted = pos
            items.append((line, value))
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise _json_error(path, json.JSONDecodeError("Expecting ',' or ']'", text, pos)) from None
    if skip(pos) != len(text):
        raise _json_error(path, json.JSONDecodeError("Extra data after the array", text, skip(pos)))
    return items


def _read_jsonl(path: str, dataset: str) -> list[RawRecord]:
    """One JSON object per line; blank lines are not records. A line that does not decode or parse
    is a bad record (skippable), not a broken file."""
    data = Path(path).read_bytes()
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    lines = data[offset:].split(b"\n")
    records = []
    for number, chunk in enumerate(lines, start=1):
        start, offset = offset, offset + len(chunk) + 1
        if not chunk.strip():
            continue
        source = RecordSource(path, len(records), number, dataset)
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            records.append(RawRecord(source, error=RecordError(WHOLE_RECORD, (
                f"not valid UTF-8 at byte offset {start + err.start} of the file "
                f"({chunk[err.start:err.start + 4]!r}); re-save the file as UTF-8")),
                text=chunk[:2000].decode("utf-8", "replace")))
            continue
        try:
            records.append(RawRecord(source, json.loads(text)))
        except json.JSONDecodeError as err:
            reason = f"not valid JSON at column {err.colno}: {_json_reason(err)}"
            if _ends_early(err):
                reason += ("; the file ends in the middle of this record (was it cut off?)"
                           if number >= len(lines) - 1 else "; the line ends in the middle of the record")
            records.append(RawRecord(source, error=RecordError(WHOLE_RECORD, reason), text=text[:2000]))
    return records


def _read_csv(path: str, dataset: str) -> list[RawRecord]:
    """A CSV file with a header row; every value is a string (an empty cell is "")."""
    text = _decode(Path(path).read_bytes(), path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    # A cell may hold up to MAX_FIELD_CHARS; csv's own default limit is 131,072 characters.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, 4_000_000))
    try:
        header = reader.fieldnames or []
        start = reader.line_num + 1
        for row in reader:
            source = RecordSource(path, len(records), start, dataset)
            start = reader.line_num + 1
            if None in row:
                error = RecordError(WHOLE_RECORD, f"the row has {len(header) + len(row[None])} values "
                                                  f"for {len(header)} columns")
                records.append(RawRecord(source, error=error, text=str(row)))
            elif any(value is None for value in row.values()):
                missing = [column for column, value in row.items() if value is None]
                error = RecordError(missing[0], f"is missing: the row has {len(header) - len(missing)} "
                                                f"values for {len(header)} columns")
                records.append(RawRecord(source, error=error, text=str(row)))
            else:
                records.append(RawRecord(source, row))
    except csv.Error as err:
        raise DataError(f"{path}: not valid CSV at line {reader.line_num}: {err}") from None
    finally:
        csv.field_size_limit(limit)
    return records


def _read_parquet(path: str, dataset: str) -> list[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read it as Parquet: {err}") from None
    return [RawRecord(RecordSource(path, index, None, dataset), row) for index, row in enumerate(rows)]


READERS: dict[str, Callable[[str, str], list[RawRecord]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def _read_hub(spec: DatasetSpec) -> list[RawRecord]:
    """A dataset through `datasets.load_dataset` (the hub, or its cache)."""
    import datasets as hf_datasets

    try:
        dataset = hf_datasets.load_dataset(spec.location, name=spec.subset, split=spec.split,
                                           data_dir=spec.data_dir, revision=spec.revision)
    except Exception as err:  # anything load_dataset raises is the user's name, network or cache
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise DataError(f"{spec.where}: datasets.load_dataset({spec.location!r}, split={spec.split!r}) "
                        f"failed: {type(err).__name__}: {first_line}. If you meant a local file, "
                        "check its path; for a hub dataset, check the name, split and network") from None
    dataset = _undecoded_images(dataset)
    file = f"{spec.location}[{spec.split}]"
    return [RawRecord(RecordSource(file, index, None, spec.name), row) for index, row in enumerate(dataset)]


def _undecoded_images(dataset):
    """`dataset` with its Image columns (and lists of images) left as stored, `{"bytes", "path"}`: the
    file's own bytes reach the pair (data/media.py decodes each once), not a decoded copy re-encoded."""
    import datasets as hf_datasets

    def undecoded(feature):
        if isinstance(feature, hf_datasets.Image):
            return hf_datasets.Image(decode=False)
        if isinstance(feature, (hf_datasets.List, hf_datasets.Sequence)):
            inner = undecoded(feature.feature)
            return None if inner is None else type(feature)(inner)
        return None

    for name, feature in dataset.features.items():
        if (changed := undecoded(feature)) is not None:
            dataset = dataset.cast_column(name, changed)
    return dataset


def _decode(data: bytes, path: str) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); names the byte offset of invalid bytes."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"{path}: not valid UTF-8 at byte offset {offset} (line {line}): "
                        f"{data[offset:offset + 4]!r}; re-save the file as UTF-8") from None


def _json_error(path: str, err: json.JSONDecodeError) -> DataError:
    message = f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {_json_reason(err)}"
    if _ends_early(err):
        message += "; the file ends in the middle of a record (was it cut off while being written?)"
    return DataError(message)


def _json_reason(err: json.JSONDecodeError) -> str:
    return err.msg.replace(" starting at", " starting there")


def _ends_early(err: json.JSONDecodeError) -> bool:
    """Whether the text ended before the JSON value did (an unterminated string runs to the end)."""
    return err.msg.startswith("Unterminated string") or not err.doc[err.pos:].strip()


# ---------------------------------------------------------------------------------------------
# Sampling, converting, mixing


def sample_records(records: list[RawRecord], num_samples: int | None, max_samples: int | None,
                   seed: int, name: str) -> list[RawRecord]:
    """A registry's `num_samples`, then the first `max_samples`.

    `num_samples` follows LLaMA-Factory: a seeded random choice of that many records without
    repeats, and when it exceeds the records available, every record once plus the rest drawn
    with replacement.
    """
    if num_samples is not None:
        rng = random.Random(f"{seed}:{name}")
        order = list(range(len(records)))
        rng.shuffle(order)
        order = order[:num_samples] + [rng.randrange(len(records)) for _ in range(num_samples - len(order))]
        records = [records[i] for i in order]
    return records if max_samples is None else records[:max_samples]


def convert_records(records: list[RawRecord], fmt: RecordFormat, spec: DatasetSpec,
                    on_bad_record: str, report: DataReport, media: MediaReader | None = None) -> list[PreferencePair]:
    """Each record → a pair with its media (`media`: where to find them; default: beside the data),
    or (on_bad_record: skip) a counted reject; otherwise a bad record stops the run with a DataError
    naming file, record, line and field."""
    media = media or MediaReader(os.path.dirname(spec.location) or ".", local=not spec.hub)
    pairs = []
    report.skipped[spec.name] = 0
    for raw in records:
        try:
            if raw.error is not None:
                raise raw.error
            pair = (to_example if fmt.unpaired else to_pair)(raw.value, fmt, raw.source)
            pairs.append(with_media(pair, raw.value, fmt, media))
        except RecordError as err:
            if on_bad_record == "error":
                raise DataError(f"{raw.source}, field '{err.field}': {err.reason}; {SKIP_HINT}") from None
            report.skipped[spec.name] += 1
            report.rejects.append({
                "dataset": spec.name, "file": raw.source.file, "index": raw.source.index,
                "line": raw.source.line, "stage": err.stage, "field": err.field, "reason": err.reason,
                "record": raw.text if raw.error is not None else _preview(raw.value),
            })
    report.loaded[spec.name] = len(pairs)
    if not pairs:
        first = report.rejects[-report.skipped[spec.name]]
        raise DataError(f"{spec.where}: all {len(records)} records were bad, so none is left; the first: "
                        f"{first['file']} record {first['index']}, field '{first['field']}': "
                        f"{first['reason']}")
    return pairs


def _preview(value: Any, limit: int = 2000) -> Any:
    """`value` for the rejects file: JSON-safe, long strings cut to `limit` characters."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"... [{len(value) - limit:,} more characters]"
    if isinstance(value, dict):
        return {str(key): _preview(item, limit) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_preview(item, limit) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray)):  # an image's bytes: their size, not their contents
        return f"<{len(value):,} bytes>"
    return str(value)


def mix(per_dataset: list[list[PreferencePair]], strategy: str, probs: list[float] | None,
        seed: int) -> list[PreferencePair]:
    """Concatenate, or interleave (as `datasets.interleave_datasets`): pick a dataset for each
    position, in turn or with `probs` (seeded), and take its next pair. `interleave_under` stops when
    a picked dataset has run out; `interleave_over` starts a finished dataset again and stops once
    every dataset (with probability > 0) has been used in full."""
    if strategy == "concat":
        return [pair for pairs in per_dataset for pair in pairs]
    oversample = strategy == "interleave_over"
    active = [i for i in range(len(per_dataset)) if probs is None or probs[i] > 0]
    rng = random.Random(seed)
    next_index = [0] * len(per_dataset)
    finished: set[int] = set()
    mixed = []
    for turn in itertools.count():
        i = active[turn % len(active)] if probs is None else rng.choices(range(len(probs)), probs)[0]
        if next_index[i] == len(per_dataset[i]):
            if not oversample:
                break
            next_index[i] = 0
        mixed.append(per_dataset[i][next_index[i]])
        next_index[i] += 1
        if next_index[i] == len(per_dataset[i]):
            finished.add(i)
            if oversample and finished.issuperset(active):
                break
    return mixed
