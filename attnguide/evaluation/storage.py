"""The output folder of an evaluation: its layout, atomic writes, the run lock and the clean-up of
temporary files left by killed writes.

Every file of an output folder (records, images, run.json, summaries, plots) is written with
``atomic_write_bytes``: a temporary file in the same folder, fsync, rename.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BadInput

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
TMP_SUFFIX = ".tmp"
RECORDS_FILE = "records.jsonl"
JOBS_DIR, IMAGES_DIR, MASKS_DIR, PLOTS_DIR = "jobs", "images", "masks", "plots"
TIMING_FIELD = "timing"  # the one record field that legitimately differs between identical runs


def read_json(path: Path) -> Any:
    """The JSON content of a file."""
    return json.loads(Path(path).read_text())


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk (or a kill) must not leave the temporary file behind
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path``, written atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))



def save_png(image, path: Path) -> None:
    """A PIL image as PNG at ``path``, written atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def folder_lock(out: Path, rank: int = 0) -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (one per rank of a run) for the block; a second
    ``eval run`` on the same folder fails at once instead of computing the same jobs."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / (LOCK_FILE if rank == 0 else f"{LOCK_FILE}.{rank}")
    fh = open(path, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: msvcrt's byte-range lock
            import msvcrt

            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise BadInput(f"--out: {str(out)!r} is in use by another `attnguide eval run` (process {holder}); "
                       "wait for it to finish, or use another --out folder") from None
    try:
        yield path
    finally:
        fh.close()  # closing releases the lock


def clean_stale_temp_files(out: Path) -> int:
    """Remove temporary files left by a killed or failed write (the caller holds the folder lock)."""
    removed = 0
    for path in Path(out).rglob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed

