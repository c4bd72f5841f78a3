"""The errors a user sees: one line each, saying what happened and how to fix it.

Anything raised as a `PrefalignError` is printed by the CLI without a traceback; every other
exception is a bug in prefalign and keeps its traceback.
"""

from __future__ import annotations


class PrefalignError(Exception):
    """A problem with the user's input or environment, reported as a clean message."""


class ConfigError(PrefalignError):
    """One or more bad settings. `problems` holds one line per problem, all reported together."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} configuration problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class DataError(PrefalignError):
    """A preference record or data file that cannot be used; the message names file, record and field."""


class PairError(DataError):
    """One record that failed at `stage` (see STAGES) in `field`; `on_bad_record: skip` skips it."""

    def __init__(self, stage: str, where: str, field: str, reason: str):
        super().__init__(f"{where}, field {field}: {reason}")
        self.stage, self.where, self.field, self.reason = stage, where, field, reason

    def __reduce__(self):  # raised in a tokenization worker process, it crosses back whole
        return PairError, (self.stage, self.where, self.field, self.reason)


STAGES = ("parse", "media", "render", "prefix", "tokenize")
"""Where a record can fail: reading it into a pair, reading its images and videos (data/media.py), rendering it with the chat template, the
prompt/response boundary (the prompt is not a prefix of prompt + reply), tokenizing it."""


def closest(value: object, choices) -> str | None:
    """The choice closest to `value`: by spelling, else the first that `value` begins; None if none is close."""
    import difflib

    options = [str(c) for c in choices]
    text = str(value)
    close = difflib.get_close_matches(text, options, n=1, cutoff=0.6)
    close = close or [o for o in options if text and o.startswith(text)]
    return close[0] if close else None


def did_you_mean(value: object, choices) -> str:
    """"did you mean 'x'?" for the choice closest to `value`, or "": the one "did you mean" of every message."""
    match = closest(value, choices)
    return f"did you mean {match!r}?" if match is not None else ""


# How a write cut short by the disk surfaces: an OSError (ENOSPC, EDQUOT; EFBIG past a file-size
# limit, `ulimit -f`), safetensors' own error carrying the OS's text, or torch.save's zip writer, which
# loses the errno and raises RuntimeError ("basic_ios::clear: iostream error", then "unexpected pos"
# from its end-of-file check; "PytorchStreamWriter failed writing file" in other versions).
_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_TOO_LARGE = ("File too large", "os error 27")
_TORCH_WRITER = ("basic_ios::clear", "unexpected pos", "PytorchStreamWriter failed writing file")


def _disk_failure(exc: BaseException) -> tuple[str, str] | None:
    """(what happened, how to fix it) for a write the disk cut short; None if it is no disk failure.

    The exception and those it was raised from or during (torch.save raises its "unexpected pos"
    while handling the write error itself) are read.
    """
    import errno

    elsewhere = "set output_dir to a folder on another disk"
    seen = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, PrefalignError):  # already said
        seen.add(id(exc))
        code, text = getattr(exc, "errno", None), str(exc)
        if code in (errno.ENOSPC, errno.EDQUOT) or any(m in text for m in _FULL):
            return "no space left on device", f"free some space or {elsewhere}"
        if code == errno.EFBIG or any(m in text for m in _TOO_LARGE):
            return ("a file too large for this disk or for the file-size limit",
                    f"raise the limit (ulimit -f) or {elsewhere}")
        if isinstance(exc, RuntimeError) and any(m in text for m in _TORCH_WRITER):
            return ("torch.save could not finish its file (a full disk or a file-size limit)",
                    f"free some space, raise the limit (ulimit -f) or {elsewhere}")
        exc = exc.__cause__ if exc.__suppress_context__ else exc.__cause__ or exc.__context__
    return None


def is_disk_full(exc: BaseException) -> bool:
    """True for a write cut short by the disk however it surfaces (see `_disk_failure`)."""
    return _disk_failure(exc) is not None


def _free_space(where) -> str:
    """"N MiB free" on the disk holding `where` (its nearest existing folder); "" if that cannot be read."""
    import shutil
    from pathlib import Path

    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"{free / 2**20:.1f} MiB free there"


def unwritable_error(exc: BaseException, target=None) -> "PrefalignError | None":
    """The one-line error for a full, read-only or forbidden disk while writing `target`; None for any other error.

    The one wording of every disk error, used by `reporting_disk_full` (which knows the folder being
    written) and by the CLI (for a write outside it).
    """
    import errno

    if isinstance(exc, PrefalignError):
        return None
    where = target or getattr(exc, "filename", None) or "the output"
    failure = _disk_failure(exc)
    if failure is not None:
        (what, fix), free = failure, _free_space(where) if where != "the output" else ""
        return PrefalignError(f"{what} while writing to {where}{f' ({free})' if free else ''}; {fix}")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS):
        return PrefalignError(f"cannot write to {where}: {exc.strerror}; choose a folder you can write to")
    return None


class reporting_disk_full:
    """Context manager: a full disk while writing under `target` becomes a one-line PrefalignError."""

    def __init__(self, target):
        self.target = target

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and is_disk_full(exc):
            raise unwritable_error(exc, self.target) from None
        return False
