"""Files that are either whole or absent: checksums, atomic writes, atomic folder replacement.

Shared by the on-disk caches (encoded data, reference log-probs), checkpoints and the final save,
so that a crash, a kill or a second process never leaves a file that looks finished but is not,
and damage done later (a truncated or bit-flipped file) is noticed when the file is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_checksums(folder: str | Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative posix path -> hex), except the names in `skip`."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def damaged_files(folder: str | Path, expected: dict[str, str]) -> list[str]:
    """The files of `expected` that are missing under `folder` or whose checksum differs."""
    folder = Path(folder)
    return [name for name, sha in expected.items()
            if not (folder / name).is_file() or file_sha256(folder / name) != sha]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, value) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def replace_folder(staging: str | Path, target: str | Path) -> None:
    """Put the finished folder `staging` at `target`, replacing whatever is there.

    `os.replace` cannot rename onto a non-empty folder, so an existing `target` is first renamed
    aside (atomic) and deleted afterwards: at every moment `target` is absent, the old folder or
    the new one, never a mix. Two processes racing here both end with a complete folder in place.
    """
    staging, target = Path(staging), Path(target)
    aside = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        os.replace(target, aside)
    except FileNotFoundError:
        aside = None
    except OSError:  # another process moved it aside first
        aside = None
    try:
        os.replace(staging, target)
    except OSError:  # another process put its (equivalent) copy there in between
        shutil.rmtree(staging, ignore_errors=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def tensors_sha256(tensors: dict) -> str:
    """SHA-256 over a dict of CPU tensors: names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
