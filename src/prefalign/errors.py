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


def is_disk_full(exc: BaseException) -> bool:
    """True for 'no space left on device' however it surfaces (OSError, or a library's own error)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


def unwritable_error(exc: BaseException, target=None) -> "PrefalignError | None":
    """The one-line error for a full, read-only or forbidden disk while writing `target`; None for any other error.

    The one wording of every disk error, used by `reporting_disk_full` (which knows the output dir)
    and by the CLI (for a write outside it).
    """
    import errno

    if isinstance(exc, PrefalignError):
        return None
    where = target or getattr(exc, "filename", None) or "the output"
    if is_disk_full(exc):
        return PrefalignError(f"no space left on device while writing to {where}; free some space or set "
                              "output_dir to a folder on another disk")
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
