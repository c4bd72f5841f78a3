"""Checks of the paths a config names, made before anything is loaded.

A name is a hub id (`org/name`) or a local folder; transformers answers a missing local folder
with "Repo id must be in the form ..." or a network error, so prefalign decides here which one the
user meant and says "no such directory" (with the closest existing sibling) for a missing folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from prefalign.demo import BUILD_INFO_FILE


def looks_local(name: str) -> bool:
    """True when `name` can only be a local path: absolute, ./ ../ ~, 2+ slashes, or its parent folder exists."""
    if name.startswith(("/", ".", "~")) or name.count("/") >= 2 or "\\" in name:
        return True
    parent = Path(name).expanduser().parent
    return "/" in name and parent != Path(".") and parent.is_dir()


def _closest_sibling(path: Path, *, demo_only: bool = False) -> Path | None:
    parent = path.parent
    if not parent.is_dir():
        return None
    siblings = {p.name: p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")
                and (not demo_only or (p / BUILD_INFO_FILE).is_file())}
    close = difflib.get_close_matches(path.name, list(siblings), n=1, cutoff=0.6)
    return siblings[close[0]] if close else None


def missing_folder_problem(key: str, name: str | None) -> str | None:
    """A one-line problem when `key` names a local folder that does not exist."""
    if not name or not looks_local(name) or Path(name).expanduser().exists():
        return None
    path = Path(name).expanduser()
    close = _closest_sibling(path)
    hint = f"; did you mean {str(close)!r}?" if close else ""
    return f"{key}: no such directory {name!r}{hint}"


def demo_model_problem(name: str) -> str | None:
    """With build_demo_model: refuse to build a second demo model beside one whose name is close (a typo)."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return None
    close = _closest_sibling(path, demo_only=True)
    if close is None:
        return None
    return (f"model_name_or_path: {name!r} does not exist, and build_demo_model: true would build a second demo "
            f"model beside {str(close)!r}; did you mean {str(close)!r}? (to build a new one, pick a name not close "
            "to an existing model's)")


def output_dir_problem(output_dir: str) -> str | None:
    """output_dir must be a folder or creatable as one: not a file, not under a file."""
    path = Path(output_dir).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate.is_dir():
                return None
            where = "is a file" if candidate == path else f"is under {str(candidate)!r}, which is a file"
            return f"output_dir: {output_dir!r} {where}; choose a folder"
    return None


def path_problems(model, finetuning, output_dir: str) -> list[str]:
    """Every path problem of a config: model, adapters, reference model, output_dir."""
    from prefalign.modeling.load import _split_paths

    problems = []
    if model.model_name_or_path:
        if model.build_demo_model:
            problems.append(demo_model_problem(model.model_name_or_path))
        else:
            problems.append(missing_folder_problem("model_name_or_path", model.model_name_or_path))
    for adapter in _split_paths(model.adapter_name_or_path):
        problems.append(missing_folder_problem("adapter_name_or_path", adapter))
    problems.append(missing_folder_problem("ref_model", finetuning.ref_model))
    for adapter in _split_paths(finetuning.ref_model_adapters):
        problems.append(missing_folder_problem("ref_model_adapters", adapter))
    problems.append(output_dir_problem(output_dir))
    return [p for p in problems if p]
