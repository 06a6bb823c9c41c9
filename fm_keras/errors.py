"""Errors a user can act on. Each message names the file, column or key and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# difflib's similarity ratio a name must reach to be offered as "did you mean": typos
# ('lable' / 'label' 0.80, 'clik' / 'click' 0.89) pass; another word that shares letters does
# not ('genres' / 'gender' 0.67, under difflib's own default of 0.6 it was offered).
CLOSE_MATCH_CUTOFF = 0.75


def close_match(word: str, candidates: Iterable) -> str | None:
    """The candidate a misspelt `word` most likely means, or None when none is close.

    Args:
        word: what the user wrote (a key, a column name, a choice).
        candidates: the valid names (converted with str).

    Returns:
        The closest candidate by `difflib.SequenceMatcher` ratio if it is at least
        `CLOSE_MATCH_CUTOFF`, else None.
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1,
                                      cutoff=CLOSE_MATCH_CUTOFF)
    return close[0] if close else None


class FMKerasError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(FMKerasError, ValueError):
    """A YAML config or CLI argument is invalid."""


class DataError(FMKerasError, ValueError):
    """Input data does not fit the feature spec (missing column, bad value, empty file...)."""


class TrainingDivergedError(FMKerasError, RuntimeError):
    """Loss or parameters became non-finite during training."""


class RunError(FMKerasError, ValueError):
    """A run directory is missing, incomplete or not an fm_keras run."""


class ExportError(FMKerasError, ValueError):
    """A model cannot be exported, indexed or loaded as an fm_keras export."""


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM while a command runs, so that it unwinds as on
    Ctrl-C: temp files and directories are removed, nothing half-written stays behind.

    A BaseException (like KeyboardInterrupt): code that handles errors does not swallow it.
    """

    def __str__(self) -> str:
        return "terminated by SIGTERM"


def error_line(err: BaseException) -> str:
    """One line saying what went wrong: ``Type: message`` with the message's lines joined,
    ``terminated by SIGTERM`` for `Terminated`, ``interrupted by SIGINT`` for Ctrl-C.

    Args:
        err: the exception that ended a command or a step.

    Returns:
        The line (no newline), for a run record or a summary's ``error`` field.
    """
    if isinstance(err, Terminated):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted by SIGINT"
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
