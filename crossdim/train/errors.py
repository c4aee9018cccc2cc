"""Errors of the training job, each raised with a one-line message."""

from __future__ import annotations


class TrainConfigError(ValueError):
    """A pre-flight problem found before any Ray Train work (names the field, file or resource)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the job stopped and kept its last good checkpoint."""
