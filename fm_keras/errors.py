"""Errors a user can act on. Each message names the file, column or key and the fix."""

from __future__ import annotations


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
