"""Evaluation harness: sweep guidance methods and scales over a prompt set, resumably and sharded.

A *job* is one image: (config, prompt index p, sample index k), where a config is a method with
its scales. Its seed is ``seed + 1000 * p + k`` -- a function of (p, k) only, so every method and
scale starts from the same initial noise for the same (prompt, sample).

Layout of an output folder ``OUT``::

    run.json                  settings that must not change between resumed calls (checked)
    jobs/<config>/pPPPPP_kKKK.json   one record per finished image (written atomically: tmp + rename)
    images/<config>/pPPPPP_kKKK.png  the image
    masks/<config>/pPPPPP_kKKK.png   S-CFG mask overlay (scfg methods, first prompts, sample 0)
    records.jsonl             all records, merged from jobs/ (derived; rebuilt by ``report``)
    summary.csv / .md / .json per-config metrics (derived)
    plots/*.png               quality-vs-alignment, metric-vs-scale, sample grid (derived)

Jobs are batched into *work units*: each config's jobs in (p, k) order are cut into chunks of
``batch``. The units, not single jobs, are what gets sharded (unit i goes to process
i % world_size), because float results depend slightly on the batch an image was computed in;
this way a sharded run computes every image in exactly the batch a single-process run does, and
the merged records are identical apart from their ``timing`` field. A resumed call skips every
finished job; a unit with some records missing (a kill while its records were being written) is
generated again as a whole (same numbers) and only its missing records are written.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm.auto import tqdm

from ..guidance import METHODS, REGISTRY, SCFG_MODES

SEED_STRIDE = 1000  # seed = base + SEED_STRIDE * prompt_index + sample_index
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
TMP_SUFFIX = ".tmp"
RECORDS_FILE = "records.jsonl"
JOBS_DIR, IMAGES_DIR, MASKS_DIR, PLOTS_DIR = "jobs", "images", "masks", "plots"
TIMING_FIELD = "timing"  # the one record field that legitimately differs between identical runs
DEFAULT_PAG_ONLY_SCALE = 2.0
DEFAULT_W_BUILTIN, DEFAULT_W_OTHER = 5.0, 7.5
DEFAULT_BUILTIN_PROMPTS = 100
# Settings that fix what an image is; a resumed call must repeat them.
FIXED_SETTINGS = ("model", "model_fingerprint", "prompts", "prompt_seed", "steps", "seed", "height", "width",
                  "dtype", "pag_layers", "scfg_mode", "negative_prompt")


# --------------------------------------------------------------------------------------------
# Configs and jobs


@dataclass(frozen=True)
class Config:
    """A method with its scales: ``guidance_scale`` is w (cfg, scfg, cfg+pag, scfg+pag),
    ``pag_scale`` is s (pag, cfg+pag, scfg+pag); a scale the method does not use is None."""

    method: str
    guidance_scale: float | None = None
    pag_scale: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--methods: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        uses_w, uses_s = REGISTRY[self.method].uses_cfg, REGISTRY[self.method].pag
        for name, value, used in (("w", self.guidance_scale, uses_w), ("s", self.pag_scale, uses_s)):
            if used and value is None:
                raise ValueError(f"--methods: {self.method} needs a scale {name}")
            if not used and value is not None:
                raise ValueError(f"--methods: {self.method} takes no scale {name}, got {value!r}")
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--scales: scale {name} of {self.method} must be a finite number >= 0, got {value!r}")

    @property
    def label(self) -> str:
        """``none``, ``cfg@5``, ``pag@2``, ``cfg+pag@5/1.5`` (the ``--methods`` syntax)."""
        scales = [f"{v:g}" for v in (self.guidance_scale, self.pag_scale) if v is not None]
        return self.method + (f"@{'/'.join(scales)}" if scales else "")

    @property
    def slug(self) -> str:
        """A folder name: ``cfg_w5``, ``pag_s2``, ``cfg-pag_w5_s1.5``."""
        parts = [self.method.replace("+", "-")]
        if self.guidance_scale is not None:
            parts.append(f"w{self.guidance_scale:g}")
        if self.pag_scale is not None:
            parts.append(f"s{self.pag_scale:g}")
        return "_".join(parts)

    @property
    def scale(self) -> float | None:
        """The swept scale: w for methods with CFG, s for pag, None for none."""
        return self.guidance_scale if self.guidance_scale is not None else self.pag_scale

    @property
    def uses_scfg(self) -> bool:
        return REGISTRY[self.method].uses_scfg

    def generate_kwargs(self) -> dict[str, Any]:
        """The method and scales as keyword arguments of ``attnguide.generate``."""
        kwargs: dict[str, Any] = {"method": self.method}
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if self.pag_scale is not None:
            kwargs["pag_scale"] = self.pag_scale
        return kwargs


def _float(text: str, param: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{param}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{param}: scales must be finite numbers >= 0, got {text!r}")
    return value


def parse_scales(text: str | None) -> list[float] | None:
    """``"3,5,7.5"`` -> [3.0, 5.0, 7.5]; None or empty -> None."""
    if text is None or not text.strip():
        return None
    return [_float(t.strip(), "--scales") for t in text.split(",") if t.strip()]


def parse_configs(
    methods: Iterable[str],
    scales: Sequence[float] | None = None,
    pag_scale: float = 1.5,
    default_w: float = DEFAULT_W_BUILTIN,
    default_pag_only: float = DEFAULT_PAG_ONLY_SCALE,
) -> list[Config]:
    """Configs from ``--methods`` items (comma lists allowed) and ``--scales``.

    An item is ``METHOD`` or ``METHOD@SCALES``: ``cfg@5``/``scfg@5`` (w), ``pag@2`` (s),
    ``cfg+pag@5/1.5`` (w/s) or ``cfg+pag@5`` (w, s = ``pag_scale``). A ``METHOD`` without ``@``
    gets one config per value of ``scales`` -- w for cfg/scfg/cfg+pag/scfg+pag (s fixed to
    ``pag_scale``), s for pag -- or, without ``scales``, ``default_w`` resp. ``default_pag_only``.
    ``none`` takes no scale. Duplicates are dropped, order kept.
    """
    configs: list[Config] = []
    for item in (m.strip() for value in methods for m in value.split(",")):
        if not item:
            continue
        method, at, spec = item.partition("@")
        method = method.strip()
        if method not in METHODS:
            raise ValueError(f"--methods: unknown method {method!r} in {item!r}; choose from {', '.join(METHODS)}")
        if at:
            configs.append(_explicit_config(method, spec, item, pag_scale))
        elif not REGISTRY[method].uses_cfg and not REGISTRY[method].pag:
            configs.append(Config(method))
        elif not REGISTRY[method].uses_cfg:
            configs.extend(Config(method, None, s) for s in (scales or [default_pag_only]))
        else:
            s = pag_scale if REGISTRY[method].pag else None
            configs.extend(Config(method, w, s) for w in (scales or [default_w]))
    if not configs:
        raise ValueError("--methods: no method given")
    return list(dict.fromkeys(configs))


def _explicit_config(method: str, spec: str, item: str, pag_scale: float) -> Config:
    values = [_float(v.strip(), f"--methods ({item})") for v in spec.split("/")]
    entry = REGISTRY[method]
    if not entry.uses_cfg and not entry.pag:
        raise ValueError(f"--methods: {method} takes no scale, got {item!r}")
    if not entry.uses_cfg:
        if len(values) != 1:
            raise ValueError(f"--methods: {method} takes one scale (s), as {method}@2; got {item!r}")
        return Config(method, None, values[0])
    if not entry.pag:
        if len(values) != 1:
            raise ValueError(f"--methods: {method} takes one scale (w), as {method}@5; got {item!r}")
        return Config(method, values[0], None)
    if len(values) not in (1, 2):
        raise ValueError(f"--methods: {method} takes w or w/s, as {method}@5/1.5; got {item!r}")
    return Config(method, values[0], values[1] if len(values) == 2 else pag_scale)


def config_from_record(record: dict[str, Any]) -> Config:
    """The config a record was made with."""
    return Config(record["method"], record["guidance_scale"], record["pag_scale"])


def job_seed(base: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample k of prompt p: ``base + 1000 p + k``, the same for every config."""
    if not 0 <= sample_index < SEED_STRIDE:
        raise ValueError(f"--n: at most {SEED_STRIDE} samples per prompt, got sample index {sample_index}")
    return base + SEED_STRIDE * prompt_index + sample_index


@dataclass(frozen=True)
class Job:
    """One image to make: a config, a prompt (by index) and a sample index, with its seed."""

    config: Config
    prompt_index: int
    sample_index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"p{self.prompt_index:05d}_k{self.sample_index:03d}"

    @property
    def key(self) -> str:
        return f"{self.config.slug}/{self.name}"

    def record_path(self, out: Path) -> Path:
        return out / JOBS_DIR / self.config.slug / f"{self.name}.json"

    def image_rel(self) -> str:
        return f"{IMAGES_DIR}/{self.config.slug}/{self.name}.png"

    def mask_rel(self) -> str:
        return f"{MASKS_DIR}/{self.config.slug}/{self.name}.png"


def build_jobs(configs: Sequence[Config], prompts: Sequence[str], n: int, seed: int) -> list[Job]:
    """Every job, config-major, then by prompt, then by sample."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n!r}")
    return [
        Job(c, p, k, prompt, job_seed(seed, p, k))
        for c in configs for p, prompt in enumerate(prompts) for k in range(n)
    ]


def work_units(jobs: Sequence[Job], batch: int) -> list[list[Job]]:
    """Jobs cut into batches: consecutive jobs of one config, at most ``batch`` each."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch!r}")
    units: list[list[Job]] = []
    for job in jobs:
        if units and units[-1][0].config == job.config and len(units[-1]) < batch:
            units[-1].append(job)
        else:
            units.append([job])
    return units


def shard(units: Sequence[list[Job]], rank: int, world_size: int) -> list[list[Job]]:
    """The units of process ``rank``: unit i goes to process i % world_size."""
    return [u for i, u in enumerate(units) if i % world_size == rank]


# --------------------------------------------------------------------------------------------
# Prompts and model


def load_prompts(source: str, num_prompts: int | None, prompt_seed: int):
    """Prompts and, for ``builtin``, their scenes (ground truth).

    ``source`` is ``builtin`` -- the first ``num_prompts`` (default 100) held-out scenes of
    ``data.scenes(prompt_seed, ...)`` -- or a UTF-8 text file with one prompt a line (blank lines
    and lines starting with ``#`` skipped; the first ``num_prompts`` when given). Returns
    ``(prompts, scenes or None)``.
    """
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts!r}")
    if source == "builtin":
        from ..builtin import data

        scenes = data.scenes(prompt_seed, num_prompts or DEFAULT_BUILTIN_PROMPTS, "heldout")
        return [s.caption for s in scenes], scenes
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--prompts must be 'builtin' or a text file of prompts; {source!r} is neither")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts: {source!r} holds no prompts (one per line expected)")
    return prompts[:num_prompts] if num_prompts else prompts, None


def model_fingerprint(folder: str | Path) -> str:
    """A short content hash of a model folder (every file's path and size; the content of files
    up to 256 MiB, the first and last MiB of larger ones)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= 256 << 20:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def model_folder(model: str | None) -> Path:
    """The model's folder (default: the built-in model)."""
    from ..pipelines import builtin_model_path

    return Path(model) if model else builtin_model_path()


def recommended_w(model: str | None) -> float:
    """w to use when none is given: the model folder's ``attnguide.json`` ``guidance_scale``,
    else 5.0 for the built-in model and 7.5 for others."""
    path = model_folder(model) / "attnguide.json"
    if path.is_file():
        return float(json.loads(path.read_text()).get("guidance_scale", DEFAULT_W_OTHER))
    return DEFAULT_W_BUILTIN if model is None else DEFAULT_W_OTHER


def load_model(model: str | None, device: str, dtype: str, attempts: int = 5):
    """Load the pipeline and fingerprint its folder, retrying when the folder changed while it
    was read (the built-in model folder is swapped atomically by training exports)."""
    from ..pipelines import load_pipeline

    folder = model_folder(model)
    last: Exception | None = None
    for attempt in range(attempts):
        swapping = folder.with_name(folder.name + ".tmp").exists() or folder.with_name(folder.name + ".old").exists()
        if not (folder / "model_index.json").is_file() and not swapping:
            last = FileNotFoundError(f"{str(folder)!r} has no model_index.json")
            break
        try:
            before = model_fingerprint(folder)
            pipe = load_pipeline(model, device=device, dtype=dtype)
            if model_fingerprint(folder) == before:
                return pipe, before
        except (OSError, ValueError) as exc:
            last = exc
            if not swapping and attempt >= 1:
                break  # a broken folder, not one being swapped: retrying will not help
        time.sleep(1.0 + attempt)
    where = "the built-in model (train it with `attnguide train`, or pass --model)" if model is None else repr(str(folder))
    reason = " ".join(str(last).split()) if last else "it kept changing"
    raise BadInput(f"--model: could not load a stable model from {where}: {reason}")


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
# Settings and run metadata


@dataclass
class EvalSettings:
    """Everything ``run_eval`` needs (the ``attnguide eval run`` options)."""

    out: Path
    configs: list[Config]
    prompts: str = "builtin"
    num_prompts: int | None = None
    prompt_seed: int = 1000
    n: int = 1
    model: str | None = None
    steps: int = 30
    seed: int = 0
    batch: int = 8
    pag_layers: tuple[str, ...] = ("mid",)
    scfg_mode: str = "reference"
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    evaluator: str | None = None
    clip: str | None = None
    min_real: int = 500
    grid_prompts: int = 4
    progress: bool = True
    report: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("steps", "batch", "n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)!r}")
        if self.scfg_mode not in SCFG_MODES:
            raise ValueError(f"--scfg-mode must be one of {SCFG_MODES}, got {self.scfg_mode!r}")
        if self.min_real < 2:
            raise ValueError(f"--min-real must be >= 2, got {self.min_real!r}")
        if self.grid_prompts < 0:
            raise ValueError(f"--grid-prompts must be >= 0, got {self.grid_prompts!r}")
        if self.clip is not None and not Path(self.clip).is_dir():
            raise ValueError(f"--clip: CLIP model folder {self.clip!r} does not exist (nothing is downloaded)")
        if self.evaluator is not None and not Path(self.evaluator).is_file():
            raise ValueError(f"--evaluator: weights file {self.evaluator!r} does not exist")


def _run_meta(settings: EvalSettings, fingerprint: str) -> dict[str, Any]:
    return {
        "model": str(model_folder(settings.model).resolve()) if settings.model else "builtin",
        "model_fingerprint": fingerprint,
        "prompts": settings.prompts if settings.prompts == "builtin" else str(Path(settings.prompts).resolve()),
        "prompt_seed": settings.prompt_seed,
        "steps": settings.steps,
        "seed": settings.seed,
        "height": settings.height,
        "width": settings.width,
        "dtype": settings.dtype,
        "pag_layers": list(settings.pag_layers),
        "scfg_mode": settings.scfg_mode,
        "negative_prompt": settings.negative_prompt,
        "evaluator": settings.evaluator,
        "clip": settings.clip,
        "min_real": settings.min_real,
        "configs": [c.label for c in settings.configs],
        "num_prompts": settings.num_prompts,
        "n": settings.n,
    }


def _check_compatible(stored: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    changed = [k for k in FIXED_SETTINGS if stored.get(k) != meta.get(k)]
    if changed:
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {meta.get(k)!r}" for k in changed)
        raise click.ClickException(
            f"--out: {str(out)!r} holds a run made with other settings ({details}). Resume with the same "
            "settings, or use a new --out folder."
        )


def _merged_meta(stored: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any]:
    """The run metadata after this call: configs of earlier calls are kept (first-seen order)."""
    if not stored:
        return meta
    merged = dict(meta)
    merged["configs"] = list(dict.fromkeys([*stored.get("configs", []), *meta["configs"]]))
    return merged


def read_json(path: Path) -> Any:
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
    atomic_write_bytes(path, text.encode("utf-8"))


def _save_png(image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


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


def _resolve_device(device: str, dist: Dist) -> str:
    if device != "auto":
        return device
    if dist.device:
        return dist.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def to_eval_array(image, resolution: int) -> np.ndarray:
    """A PIL image as uint8 (H, W, 3) at the evaluator's resolution (bilinear resize if needed)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


class _Scorer:
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
            from .evaluator import score_prompt

            arrays = np.stack([to_eval_array(im, data.RESOLUTION) for im in images])
            for entry, job, found in zip(out, jobs, self.evaluator.detect(arrays)):
                entry["scores"] = score_prompt(self.scenes[job.prompt_index], found)
                entry["detected"] = [asdict(d) for d in found]
        if self.clip is not None:
            for entry, value in zip(out, self.clip(list(images), [j.prompt for j in jobs])):
                entry["clip_score"] = value
        return out


def _run_unit(pipe, unit: list[Job], missing: set[str], settings: EvalSettings, scorer: _Scorer,
              generate_fn: Callable, fingerprint: str, dist: Dist) -> int:
    """Generate one work unit, score it and write the records of its ``missing`` jobs."""
    config = unit[0].config
    masks_for = [j.config.uses_scfg and j.sample_index == 0 and j.prompt_index < settings.grid_prompts for j in unit]
    want_masks = any(masks_for)
    start = time.perf_counter()
    result = generate_fn(
        pipe, [j.prompt for j in unit], **config.generate_kwargs(), pag_layers=list(settings.pag_layers),
        num_inference_steps=settings.steps, negative_prompt=_negative(settings, config), height=settings.height,
        width=settings.width, seed=[j.seed for j in unit], return_masks=want_masks,
        mask_steps=[settings.steps - 1] if want_masks else None, scfg={"mode": settings.scfg_mode},
        output_type="pil", progress=False,
    )
    seconds = time.perf_counter() - start
    extras = scorer(unit, result.images)
    written = 0
    for i, (job, image, extra) in enumerate(zip(unit, result.images, extras)):
        if job.key not in missing:
            continue
        _save_png(image, settings.out / job.image_rel())
        record = _record(job, settings, fingerprint, result.unet_evaluations, extra)
        if masks_for[i] and result.masks is not None:
            _save_png(result.masks.render(i, image), settings.out / job.mask_rel())
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


_EVAL_OPTIONS = {"guidance_scale": "--methods/--scales (w)", "pag_scale": "--pag-scale", "pag_layers": "--pag-layers",
                 "num_inference_steps": "--steps", "num_images_per_prompt": "--batch", "negative_prompt": "--negative-prompt",
                 "height": "--height", "width": "--width", "seed": "--seed", "prompt": "--prompts", "scfg mode": "--scfg-mode",
                 "device": "--device", "dtype": "--dtype", "model": "--model"}


def _option_message(exc: BaseException) -> str:
    """A validation message that starts with an API parameter name, starting with the option instead."""
    message = " ".join(str(exc).split())
    for name in sorted(_EVAL_OPTIONS, key=len, reverse=True):
        rest = message[len(name):len(name) + 1]
        if message.startswith(name) and not (rest.isalnum() or rest == "_"):
            return _EVAL_OPTIONS[name] + message[len(name):]
    return message


def check_settings(settings: EvalSettings, pipe, prompts: Sequence[str]) -> None:
    """Everything a run would reject, checked before anything is written: every config's
    arguments of ``generate`` (with the first unit's prompts), and the range of the seeds."""
    from .. import sampling
    from ..validation import SEED_MAX

    last_seed = job_seed(settings.seed, len(prompts) - 1, settings.n - 1)
    if settings.seed < 0 or last_seed > SEED_MAX:
        raise BadInput(f"--seed: the jobs' seeds (seed + 1000 p + k) must lie in [0, {SEED_MAX}]; with --seed {settings.seed}, "
                       f"{len(prompts)} prompts and --n {settings.n} the last is {last_seed}")
    unit = list(prompts[: settings.batch])
    seeds = [settings.seed + i for i in range(len(unit))]
    for config in settings.configs:
        try:
            sampling.check_arguments(
                pipe, unit, **config.generate_kwargs(), pag_layers=list(settings.pag_layers),
                num_inference_steps=settings.steps, negative_prompt=_negative(settings, config), height=settings.height,
                width=settings.width, seed=seeds, scfg={"mode": settings.scfg_mode}, output_type="pil", progress=False,
            )
        except (ValueError, TypeError) as exc:
            raise BadInput(f"{_option_message(exc)} ({config.label})") from None


def _negative(settings: EvalSettings, config: Config) -> str | None:
    """The negative prompt for a config: only methods with CFG have an unconditional branch to use it."""
    return settings.negative_prompt if REGISTRY[config.method].uses_cfg else None


class BadInput(click.ClickException):
    """A setting the run cannot use: one line, exit code 2."""

    exit_code = 2


@contextlib.contextmanager
def folder_lock(out: Path, rank: int = 0) -> Any:
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
        raise BadInput(_option_message(exc)) from None
    pipe, fingerprint = load_model(settings.model, device, settings.dtype)
    check_settings(settings, pipe, prompts)
    meta = _run_meta(settings, fingerprint)
    run_file = settings.out / RUN_FILE
    with folder_lock(settings.out, dist.rank):
        if dist.is_main:
            clean_stale_temp_files(settings.out)
            stored = read_json(run_file) if run_file.is_file() else None
            if stored and not _has_results(settings.out):
                stored = None  # a start that failed before any job finished: nothing to protect
            if stored:
                _check_compatible(stored, meta, settings.out)
            atomic_write_text(run_file, json.dumps(_merged_meta(stored, meta), indent=1) + "\n")
        dist.barrier()
        _check_compatible(read_json(run_file), meta, settings.out)  # every process saw the same model

        jobs = build_jobs(settings.configs, prompts, settings.n, settings.seed)
        units = shard(work_units(jobs, settings.batch), dist.rank, dist.world_size)
        todo = pending_units(units, settings.out)
        mine = sum(len(u) for u in units)
        outcome = RunOutcome(total_jobs=len(jobs), done_before=mine - sum(len(m) for _, m in todo), computed=0)
        if todo:
            scorer = _Scorer(settings, scenes, device)
            bar = tqdm(total=sum(len(m) for _, m in todo), desc=f"eval {dist.rank + 1}/{dist.world_size}",
                       position=dist.rank, disable=not settings.progress, unit="img")
            for unit, missing in todo:
                outcome.computed += _run_unit(pipe, unit, missing, settings, scorer, generate_fn, fingerprint, dist)
                bar.update(len(missing))
            bar.close()
        dist.barrier()
        if dist.is_main and settings.report:
            outcome.summary, outcome.notes = report(settings.out, progress=settings.progress)
    return outcome


# --------------------------------------------------------------------------------------------
# Records -> summary


def load_job_records(out: Path) -> list[dict[str, Any]]:
    """Every finished job's record, sorted by config slug and job name."""
    folder = Path(out) / JOBS_DIR
    paths = sorted(folder.glob("*/*.json")) if folder.is_dir() else []
    return [read_json(p) for p in paths]


def merge_records(out: Path) -> list[dict[str, Any]]:
    """Merge the per-job files into ``records.jsonl`` (atomically) and return the records."""
    records = load_job_records(out)
    atomic_write_text(Path(out) / RECORDS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records


def strip_timing(record: dict[str, Any]) -> dict[str, Any]:
    """A record without the fields that differ between otherwise identical runs."""
    return {k: v for k, v in record.items() if k != TIMING_FIELD}


def _order(records: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    labels = list(dict.fromkeys([*meta.get("configs", []), *(r["config"] for r in records)]))
    present = {r["config"] for r in records}
    return [label for label in labels if label in present]


def _image_features(out: Path, records: list[dict[str, Any]], evaluator, progress: bool) -> np.ndarray:
    from PIL import Image

    from ..builtin import data

    arrays = []
    for r in tqdm(records, desc="features", disable=not progress, leave=False):
        with Image.open(out / r["image"]) as im:
            arrays.append(to_eval_array(im, data.RESOLUTION))
    return evaluator.features(np.stack(arrays)) if arrays else np.zeros((0, 1))


def data_resolution() -> int:
    """The evaluator's (and the built-in scenes') image resolution."""
    from ..builtin import data

    return data.RESOLUTION


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _real_features(meta: dict[str, Any], count: int, evaluator) -> np.ndarray:
    """Evaluator features of ``count`` rendered held-out scenes; the first ones are exactly the
    prompts' scenes (``data.scenes`` is a stream), the rest more of the same distribution."""
    from ..builtin import data

    scenes = data.scenes(meta["prompt_seed"], count, "heldout")
    return evaluator.features(data.render_batch(scenes))


def summarize(out: Path, records: list[dict[str, Any]], meta: dict[str, Any], *,
              evaluator_path: str | None = None, min_real: int | None = None,
              progress: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-config summary rows (see ``SUMMARY_FIELDS``) and notes, from records and images."""
    from . import metrics

    labels = _order(records, meta)
    by_config = {label: [r for r in records if r["config"] == label] for label in labels}
    scored = any("scores" in r for r in records)
    notes: list[str] = []
    feats: dict[str, np.ndarray] = {}
    real = None
    if scored:
        from .evaluator import Evaluator

        evaluator = Evaluator.load(evaluator_path or meta.get("evaluator"))
        all_feats = _image_features(out, records, evaluator, progress)
        index = {id(r): i for i, r in enumerate(records)}
        feats = {label: all_feats[[index[id(r)] for r in rs]] for label, rs in by_config.items()}
        n_real = max([min_real or meta.get("min_real", 500), *(len(rs) for rs in by_config.values())])
        real = _real_features(meta, n_real, evaluator)
        size = _image_size(out / records[0]["image"])
        if size != (data_resolution(), data_resolution()):
            notes.append(f"Images are {size[0]}x{size[1]}; they were resized (bilinear) to the evaluator's "
                         f"{data_resolution()}x{data_resolution()} for detection and features.")
        notes.append(f"Fréchet distance: evaluator features of each config's images vs {n_real} rendered held-out "
                     f"scenes (the prompts' own scenes first); it is biased upwards for small image counts, "
                     "so compare configs only at equal n.")
    else:
        notes.append("Prompts without ground truth: only model-agnostic metrics (and CLIP score with --clip).")
    rows = []
    for label, rs in by_config.items():
        config = config_from_record(rs[0])
        row: dict[str, Any] = {
            "config": label, "method": config.method, "w": config.guidance_scale, "s": config.pag_scale,
            "scale": config.scale, "n_images": len(rs), "n_prompts": len({r["prompt_index"] for r in rs}),
            "unet_evals_per_image": float(np.mean([r["unet_evaluations"] for r in rs])),
            "seconds_per_image": float(np.mean([r[TIMING_FIELD]["seconds_per_image"] for r in rs])),
        }
        if scored:
            row.update(metrics.geneval_summary([r["scores"] for r in rs]))
            row["fd"] = metrics.frechet(feats[label], real)
            row["diversity"], row["n_diversity_prompts"] = metrics.diversity(feats[label], [r["prompt_index"] for r in rs])
        if any("clip_score" in r for r in rs):
            row["clip_score"] = float(np.mean([r["clip_score"] for r in rs if "clip_score" in r]))
        rows.append(row)
    return rows, notes


SUMMARY_FIELDS = (
    "config", "method", "w", "s", "scale", "n_images", "n_prompts", "fully_correct", "fully_correct_se",
    "fully_correct_1obj", "fully_correct_2obj", "fully_correct_3obj", "present", "colour_bound", "size_correct", "count_correct", "relation_correct", "fd", "diversity",
    "n_diversity_prompts", "clip_score", "unet_evals_per_image", "seconds_per_image",
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """The summary as a Markdown table (only columns some row has), with notes below."""
    names = {
        "config": "config", "n_images": "images", "fully_correct": "fully correct",
        "fully_correct_1obj": "1 obj", "fully_correct_2obj": "2 obj", "fully_correct_3obj": "3 obj", "present": "present",
        "colour_bound": "colour", "size_correct": "size", "count_correct": "count", "relation_correct": "relation",
        "fd": "FD ↓", "diversity": "diversity", "clip_score": "CLIP score", "unet_evals_per_image": "U-Net evals/img",
        "seconds_per_image": "s/img",
    }
    columns = [c for c in names if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(names[c] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            if c == "fully_correct" and r.get(c) is not None:
                cells.append(f"{r[c]:.3f} ± {r['fully_correct_se']:.3f}")
            elif c == "unet_evals_per_image":
                cells.append(f"{r[c]:g}")
            elif c in ("fd", "diversity", "clip_score", "seconds_per_image"):
                cells.append(_fmt(r.get(c), 2 if c != "seconds_per_image" else 3))
            else:
                cells.append(_fmt(r.get(c)))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, rows: list[dict[str, Any]], notes: Sequence[str]) -> None:
    """summary.csv, summary.md and summary.json in ``out`` (each written atomically)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_FIELDS})
    atomic_write_text(out / "summary.csv", buffer.getvalue())
    atomic_write_text(out / "summary.md", summary_markdown(rows, notes))
    atomic_write_text(out / "summary.json", json.dumps({"rows": rows, "notes": list(notes)}, indent=1) + "\n")


def report(out: str | Path, *, evaluator_path: str | None = None, min_real: int | None = None,
           plots: bool = True, progress: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Rebuild ``records.jsonl``, the summary files and the plots of an output folder from its
    saved per-job records and images alone. Returns (summary rows, notes)."""
    out = Path(out)
    if not (out / RUN_FILE).is_file():
        raise click.ClickException(f"DIR: {str(out)!r} is not an evaluation folder (it has no {RUN_FILE})")
    meta = read_json(out / RUN_FILE)
    records = merge_records(out)
    if not records:
        raise click.ClickException(f"DIR: {str(out)!r} has no finished jobs yet")
    fingerprints = {r["model_fingerprint"] for r in records}
    if len(fingerprints) > 1:
        raise click.ClickException(f"DIR: records of {str(out)!r} come from {len(fingerprints)} different models {sorted(fingerprints)}")
    rows, notes = summarize(out, records, meta, evaluator_path=evaluator_path, min_real=min_real, progress=progress)
    write_summary(out, rows, notes)
    if plots:
        from . import plots as plotting

        plotting.make_plots(out, rows, records)
    return rows, notes


# --------------------------------------------------------------------------------------------
# Command line


@click.group(name="eval", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def eval_cli() -> None:
    """Evaluate guidance methods over prompt sets: resumable, shardable sweeps with summaries and plots."""


@eval_cli.command("run")
@click.option("--methods", "methods", multiple=True, default=("none,cfg,pag,cfg+pag,scfg,scfg+pag",),
              help="Comma list (or repeat) of METHOD or METHOD@SCALES. METHOD: " + ", ".join(METHODS) + ". "
                   "SCALES: cfg@W, scfg@W, pag@S, cfg+pag@W/S (or cfg+pag@W: S from --pag-scale), scfg+pag@W/S.")
@click.option("--scales", default=None,
              help="Comma list of scales swept for each METHOD given without '@': w for cfg, scfg, cfg+pag, scfg+pag "
                   "(s then fixed by --pag-scale), s for pag; none ignores it. Default: w = the model's "
                   "attnguide.json guidance_scale (else 5 for the built-in model, 7.5 for others), pag s = 2.")
@click.option("--pag-scale", type=click.FloatRange(0), default=1.5, help="s of cfg+pag / scfg+pag when not given as METHOD@W/S.")
@click.option("--prompts", default="builtin", help="'builtin' (held-out scenes with ground truth: all metrics) or a text file, one prompt a line (model-agnostic metrics only).")
@click.option("--num-prompts", type=click.IntRange(1), default=None, help=f"Prompts to use [default: {DEFAULT_BUILTIN_PROMPTS} for builtin, all of a file].")
@click.option("--prompt-seed", type=int, default=1000, help="Seed of the built-in held-out scenes.")
@click.option("--n", "n", type=click.IntRange(1, SEED_STRIDE), default=1, help="Images per prompt (>= 2 for diversity).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder; rerun the same command to resume.")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None, help="Local diffusers folder [default: the built-in model].")
@click.option("--steps", type=click.IntRange(1, 1000), default=30, help="Denoising steps.")
@click.option("--seed", type=int, default=0, help="Base seed: sample k of prompt p uses seed + 1000 p + k, for every method.")
@click.option("--batch", type=click.IntRange(1), default=8, help="Images per U-Net batch (and per work unit sharded across processes).")
@click.option("--pag-layers", default="mid", help="Comma list of self-attention layers or patterns PAG perturbs.")
@click.option("--scfg-mode", type=click.Choice(SCFG_MODES), default="reference", help="S-CFG arithmetic.")
@click.option("--negative-prompt", default=None, help="Negative prompt for every prompt.")
@click.option("--height", type=click.IntRange(1), default=None)
@click.option("--width", type=click.IntRange(1), default=None)
@click.option("--device", default="auto", help="torch device; auto: the process's accelerate device, else cuda if available, else cpu.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32")
@click.option("--evaluator", type=click.Path(dir_okay=False), default=None, help="Scene evaluator weights (.safetensors) [default: the shipped one].")
@click.option("--clip", type=click.Path(file_okay=False), default=None, help="Local transformers CLIP folder (safetensors) for CLIP score; never downloaded.")
@click.option("--min-real", type=click.IntRange(2), default=500, help="At least this many real (rendered) images for the Fréchet distance (never fewer than generated per config).")
@click.option("--grid-prompts", type=click.IntRange(0), default=4, help="Prompts (sample 0) in the sample grid; S-CFG masks are saved for them.")
@click.option("--no-report", is_flag=True, help="Do not write summary and plots at the end (see `attnguide eval report`).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_command(methods, scales, pag_scale, prompts, num_prompts, prompt_seed, n, out, model, steps, seed, batch,
                pag_layers, scfg_mode, negative_prompt, height, width, device, dtype, evaluator, clip, min_real,
                grid_prompts, no_report, quiet) -> None:
    """Generate and score images for every (method, scale) x prompt x sample; resumable and shardable.

    \b
    Examples:
      attnguide eval run --out outputs/eval --num-prompts 40 --steps 20
      attnguide eval run --methods cfg,scfg --scales 2,3.5,5,7.5 --n 4 --out outputs/sweep
      attnguide eval run --methods cfg@5,pag@2,cfg+pag@5/1.5 --prompts prompts.txt --model ./sd15 --out outputs/sd
      accelerate launch --multi_gpu --num_processes 2 -m attnguide.cli eval run --out outputs/eval
    \b
    Sharding: under `accelerate launch --multi_gpu --num_processes N` (torchrun; works on
    CPU-only machines too, with gloo) or `torchrun --nproc_per_node N -m attnguide.cli eval run`,
    work unit i (a batch of --batch jobs) runs in process i % N; the main process merges the
    per-job records after a barrier, identical to a one-process run apart from timing.
    (`accelerate launch --cpu` starts one process unless an MPI hostfile is configured.)
    """
    try:
        configs = parse_configs(methods, parse_scales(scales), pag_scale, recommended_w(model))
        settings = EvalSettings(
            out=Path(out), configs=configs, prompts=prompts, num_prompts=num_prompts, prompt_seed=prompt_seed, n=n,
            model=model, steps=steps, seed=seed, batch=batch, pag_layers=tuple(p for p in pag_layers.split(",") if p),
            scfg_mode=scfg_mode, negative_prompt=negative_prompt, height=height, width=width, device=device, dtype=dtype,
            evaluator=evaluator, clip=clip, min_real=min_real, grid_prompts=grid_prompts, progress=not quiet,
            report=not no_report,
        )
        load_prompts(prompts, num_prompts, prompt_seed)  # fail on a bad prompt file before loading anything
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    outcome = run_eval(settings)
    if outcome.summary is not None:
        click.echo(summary_markdown(outcome.summary, outcome.notes))
    click.echo(f"{outcome.computed} images computed by this process, {outcome.done_before} of its jobs were already done "
               f"({outcome.total_jobs} jobs in the run); results in {out}/")


@eval_cli.command("report")
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--evaluator", type=click.Path(dir_okay=False, exists=True), default=None, help="Evaluator weights [default: the run's].")
@click.option("--min-real", type=click.IntRange(2), default=None, help="Real images for the Fréchet distance [default: the run's].")
@click.option("--no-plots", is_flag=True)
def report_command(directory, evaluator, min_real, no_plots) -> None:
    """Rebuild records.jsonl, summary (CSV, Markdown, JSON) and plots of DIR from its saved records.

    \b
    Example:
      attnguide eval report outputs/eval
    """
    rows, notes = report(directory, evaluator_path=evaluator, min_real=min_real, plots=not no_plots, progress=True)
    click.echo(summary_markdown(rows, notes))
