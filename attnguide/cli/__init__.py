"""The ``attnguide`` command line: ``attnguide --help`` lists the commands."""
from . import generate, model  # noqa: F401  (registers the commands on the group)
from .app import SCFG_LEVELS, InputError, RunFailure, main

__all__ = ["main", "InputError", "RunFailure", "SCFG_LEVELS"]
