"""Running an evaluation: generate, score and record every job, resumably and sharded.

Layout of an output folder ``OUT`` (names in ``storage``)::

    run.json                  settings that must not change between resumed calls (checked)
    jobs/<config>/pPPPPP_kKKK.json   one record per finished image (written atomically: tmp + rename)
    images/<config>/pPPPPP_kKKK.png  the image
    masks/<config>/pPPPPP_kKKK.png   S-CFG mask overlay (scfg methods, first prompts, sample 0)
    records.jsonl             all records, merged from jobs/ (derived; rebuilt by ``report``)
    summary.csv / .md / .json per-config metrics (derived)
    plots/*.png               quality-vs-alignment, metric-vs-scale, sample grid (derived)

Work units (see ``sweep``) are sharded over the processes of an ``accelerate launch`` /
torchrun process group; the merged records are identical to a one-process run's apart from
their ``timing`` field. A resumed call skips every finished job; a unit with some records missing
(a kill while its records were being written) is generated again as a whole (same numbers) and
only its missing records are written.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import BadInput
from .settings import (
    EvalSettings,
    check_compatible,
    check_settings,
    load_model,
    load_prompts,
    merged_meta,
    negative_prompt_for,
    option_message,
    run_meta,
    scfg_options,
)
from .storage import (
    JOBS_DIR,
    RUN_FILE,
    TIMING_FIELD,
    atomic_write_text,
    clean_stale_temp_files,
    folder_lock,
    read_json,
    save_png,
)
from .summary import report
from .sweep import Job, build_jobs, shard, work_units

# --------------------------------------------------------------------------------------------
# Distribution


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def distributed() -> Dist:
    """The process group of ``accelerate launch --multi_gpu`` / torchrun (or of an MPI launch),
    or a single process when there is none.

    Uses ``accelerate.PartialState`` when accelerate is installed (gloo on a machine without
    CUDA, so CPU-only multi-process runs work), else ``torch.distributed`` from the
    RANK/WORLD_SIZE/MASTER_ADDR environment."""
    import torch

    world = max(int(os.environ.get(v, "1")) for v in WORLD_SIZE_VARS)
    if world <= 1:
        return Dist()
    cpu = not torch.cuda.is_available()
    try:
        from accelerate import PartialState
    except ImportError:
        PartialState = None
    if PartialState is not None:
        state = PartialState(cpu=cpu, timeout=timedelta(hours=12))
        if state.num_processes == world:
            return Dist(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        torch_dist.init_process_group("gloo" if cpu else "nccl", timeout=timedelta(hours=12))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), torch_dist.barrier, "cpu" if cpu else f"cuda:{local}")


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class RunOutcome:
    """What one ``run_eval`` call did (in this process)."""

    total_jobs: int
    done_before: int
    computed: int
    summary: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)


def _resolve_device(device: str, dist: Dist) -> str:
    if device != "auto":
        return device
    if dist.device:
        return dist.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Scorer:
    """Per-image scores: GenEval-style checks (built-in prompts) and CLIP score (``--clip``)."""

    def __init__(self, settings: EvalSettings, scenes, device: str) -> None:
        self.scenes = scenes
        self.evaluator = None
        self.clip = None
        if scenes is not None:
            from .evaluator import Evaluator

            self.evaluator = Evaluator.load(settings.evaluator)
        if settings.clip is not None:
            from .metrics import ClipScorer

            self.clip = ClipScorer(settings.clip, device=device)

    def __call__(self, jobs: Sequence[Job], images: Sequence) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in jobs]
        if self.evaluator is not None:
            from ..builtin import data
            from .evaluator import to_eval_array
            from .geneval import score_prompt

            arrays = np.stack([to_eval_array(im, data.RESOLUTION) for im in images])
            for entry, job, found in zip(out, jobs, self.evaluator.detect(arrays)):
                entry["scores"] = score_prompt(self.scenes[job.prompt_index], found)
                entry["detected"] = [asdict(d) for d in found]
        if self.clip is not None:
            for entry, value in zip(out, self.clip(list(images), [j.prompt for j in jobs])):
                entry["clip_score"] = value
        return out


def _run_unit(pipe, unit: list[Job], missing: set[str], settings: EvalSettings, scorer: Scorer,
              generate_fn: Callable, fingerprint: str, dist: Dist) -> int:
    """Generate one work unit, score it and write the records of its ``missing`` jobs."""
    config = unit[0].config
    masks_for = [j.config.uses_scfg and j.sample_index == 0 and j.prompt_index < settings.grid_prompts for j in unit]
    want_masks = any(masks_for)
    start = time.perf_counter()
    result = generate_fn(
        pipe, [j.prompt for j in unit], **config.generate_kwargs(), pag_layers=list(settings.pag_layers),
        num_inference_steps=settings.steps, negative_prompt=negative_prompt_for(settings, config), height=settings.height,
        width=settings.width, seed=[j.seed for j in unit], return_masks=want_masks,
        mask_steps=[settings.steps - 1] if want_masks else None, scfg=scfg_options(settings),
        output_type="pil", progress=False,
    )
    seconds = time.perf_counter() - start
    extras = scorer(unit, result.images)
    written = 0
    for i, (job, image, extra) in enumerate(zip(unit, result.images, extras)):
        if job.key not in missing:
            continue
        save_png(image, settings.out / job.image_rel())
        record = _record(job, settings, fingerprint, result.unet_evaluations, extra)
        if masks_for[i] and result.masks is not None:
            save_png(result.masks.render(i, image), settings.out / job.mask_rel())
            record["mask_overlay"] = job.mask_rel()
        record[TIMING_FIELD] = {
            "seconds_per_image": seconds / len(unit), "batch_seconds": seconds, "batch_size": len(unit),
            "rank": dist.rank, "world_size": dist.world_size, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(job.record_path(settings.out), json.dumps(record, sort_keys=True) + "\n")
        written += 1
    return written


def _record(job: Job, settings: EvalSettings, fingerprint: str, unet_evaluations: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "job": job.key,
        "config": job.config.label,
        "method": job.config.method,
        "guidance_scale": job.config.guidance_scale,
        "pag_scale": job.config.pag_scale,
        "prompt_index": job.prompt_index,
        "sample_index": job.sample_index,
        "prompt": job.prompt,
        "seed": job.seed,
        "steps": settings.steps,
        "model_fingerprint": fingerprint,
        "image": job.image_rel(),
        "unet_evaluations": int(unet_evaluations),
        **extra,
    }


def pending_units(units: Sequence[list[Job]], out: Path) -> list[tuple[list[Job], set[str]]]:
    """Units with at least one job lacking its record, with the keys of those jobs."""
    todo = []
    for unit in units:
        missing = {j.key for j in unit if not j.record_path(out).is_file()}
        if missing:
            todo.append((unit, missing))
    return todo


def _has_results(out: Path) -> bool:
    folder = out / JOBS_DIR
    return folder.is_dir() and any(folder.glob("*/*.json"))


def run_eval(settings: EvalSettings, *, generate_fn: Callable | None = None, dist: Dist | None = None) -> RunOutcome:
    """Run (or resume) an evaluation; the main process then merges records and writes the
    summary and plots (unless ``settings.report`` is False).

    Every setting is checked (prompts, device, model, each config's generate arguments) before
    anything is written; the folder is locked for the run, so a second process on the same folder
    fails at once; temporary files of killed writes are removed. A folder whose run.json has no
    finished job yet (a failed start) may be reused with other settings.

    ``generate_fn`` replaces ``attnguide.generate`` (tests); ``dist`` defaults to
    ``distributed()``.
    """
    from .. import sampling
    from ..pipelines import check_device

    generate_fn = generate_fn or sampling.generate
    dist = dist or distributed()
    prompts, scenes = load_prompts(settings.prompts, settings.num_prompts, settings.prompt_seed)
    device = _resolve_device(settings.device, dist)
    try:
        check_device(device)
    except ValueError as exc:
        raise BadInput(option_message(exc)) from None
    pipe, fingerprint = load_model(settings.model, device, settings.dtype)
    check_settings(settings, pipe, prompts)
    meta = run_meta(settings, fingerprint)
    with folder_lock(settings.out, dist.rank):
        _open_run_file(settings.out, meta, dist)
        jobs = build_jobs(settings.configs, prompts, settings.n, settings.seed)
        units = shard(work_units(jobs, settings.batch), dist.rank, dist.world_size)
        todo = pending_units(units, settings.out)
        mine = sum(len(u) for u in units)
        outcome = RunOutcome(total_jobs=len(jobs), done_before=mine - sum(len(m) for _, m in todo), computed=0)
        if todo:
            scorer = Scorer(settings, scenes, device)
            bar = tqdm(total=sum(len(m) for _, m in todo), desc=f"eval {dist.rank + 1}/{dist.world_size}",
                       position=dist.rank, disable=not settings.progress, unit="img")
            for unit, missing in todo:
                outcome.computed += _run_unit(pipe, unit, missing, settings, scorer, generate_fn, fingerprint, dist)
                bar.update(len(missing))
            bar.close()
        dist.barrier()
        if dist.is_main and settings.report:
            outcome.summary, outcome.notes, outcome.paired = report(settings.out, progress=settings.progress)
    return outcome


def _open_run_file(out: Path, meta: dict[str, Any], dist: Dist) -> None:
    """Start or resume the run in ``out`` (the caller holds the folder lock): the main process
    removes stale temporary files and writes run.json after checking a stored one; then every
    process checks it saw the same model."""
    run_file = out / RUN_FILE
    if dist.is_main:
        clean_stale_temp_files(out)
        stored = read_json(run_file) if run_file.is_file() else None
        if stored and not _has_results(out):
            stored = None  # a start that failed before any job finished: nothing to protect
        if stored:
            check_compatible(stored, meta, out)
        atomic_write_text(run_file, json.dumps(merged_meta(stored, meta), indent=1) + "\n")
    dist.barrier()
    check_compatible(read_json(run_file), meta, out)  # every process saw the same model
