"""Errors of the evaluation harness. They are plain exceptions (no click): the commands in
``eval_cli`` turn them into one-line messages with the ``exit_code`` given here."""
from __future__ import annotations


class BadInput(ValueError):
    """A setting the run cannot use (a bad option, an unusable model, a folder in use): exit code 2."""

    exit_code = 2


class EvalFolderError(RuntimeError):
    """An output folder that cannot be used as asked (other settings, not an evaluation folder,
    no finished jobs): exit code 1."""

    exit_code = 1
