"""Checks of the paths a config names, made before anything is loaded.

A name is a hub id (`org/name`) or a local folder; transformers answers a missing local folder
with "Repo id must be in the form ..." or a network error, so prefalign decides here which one the
user meant and says "no such directory" (with the closest existing sibling) for a missing folder.
A model that `build_demo_model` will build is checked by the demo itself (demo.py), when it is asked for.
"""

from __future__ import annotations

import difflib
from pathlib import Path


def looks_local(name: str) -> bool:
    """True when `name` can only be a local path: absolute, ./ ../ ~, 2+ slashes, or its parent folder exists."""
    if name.startswith(("/", ".", "~")) or name.count("/") >= 2 or "\\" in name:
        return True
    parent = Path(name).expanduser().parent
    return "/" in name and parent != Path(".") and parent.is_dir()


def closest_sibling(path: Path, *, holding: str | None = None) -> Path | None:
    """The existing folder beside `path` whose name is closest to its name (holding the file `holding`)."""
    parent = path.parent
    if not parent.is_dir():
        return None
    siblings = {p.name: p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")
                and (holding is None or (p / holding).is_file())}
    close = difflib.get_close_matches(path.name, list(siblings), n=1, cutoff=0.6)
    return siblings[close[0]] if close else None


def missing_folder_problem(key: str, name: str | None) -> str | None:
    """A one-line problem when `key` names a local folder that does not exist."""
    if not name or not looks_local(name) or Path(name).expanduser().exists():
        return None
    path = Path(name).expanduser()
    close = closest_sibling(path)
    hint = f"; did you mean {str(close)!r}?" if close else ""
    return f"{key}: no such directory {name!r}{hint}"


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
    problems = []
    if model.model_name_or_path and not model.build_demo_model:
        problems.append(missing_folder_problem("model_name_or_path", model.model_name_or_path))
    for adapter in model.adapter_name_or_path or []:
        problems.append(missing_folder_problem("adapter_name_or_path", adapter))
    problems.append(missing_folder_problem("ref_model", finetuning.ref_model))
    for adapter in finetuning.ref_model_adapters or []:
        problems.append(missing_folder_problem("ref_model_adapters", adapter))
    problems.append(output_dir_problem(output_dir))
    return [p for p in problems if p]
