"""Metrics of the evaluation harness, computed from per-image records and image features.

- GenEval-style alignment (built-in prompts only): the fraction of images whose prompt is fully
  satisfied, and the pass rate of every single check, from ``geneval.score_prompt`` results.
- Fréchet distance between evaluator features of generated and real (rendered) images
  (``frechet_distance``, as in the standard FID code).
- Diversity: mean pairwise L2 distance between same-prompt samples in a feature space.
- CLIP score, for any prompts, with a CLIP model the user supplies as a local folder.

Everything here is plain numpy/scipy on already computed numbers, except ``ClipScorer`` (torch).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import linalg

# Checks of geneval.score_prompt, in report order. A check that is None for an image (e.g. no
# relation in its caption) does not apply to it and is left out of that check's rate.
CHECKS: tuple[str, ...] = ("present", "colour_bound", "size_correct", "count_correct", "relation_correct")


def rate(values: Iterable[bool | None]) -> tuple[float | None, int]:
    """Fraction of True among the values that are not None, and how many were not None.
    The fraction is None when no value applies."""
    applicable = [bool(v) for v in values if v is not None]
    if not applicable:
        return None, 0
    return sum(applicable) / len(applicable), len(applicable)


def standard_error(p: float | None, n: int) -> float | None:
    """Binomial standard error sqrt(p (1 - p) / n) of a rate measured on n items."""
    if p is None or n < 1:
        return None
    return math.sqrt(p * (1.0 - p) / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """Mean of a - b over paired items (the same prompt and seed under two configs), its standard
    error (sample standard deviation of the differences / sqrt n) and z = mean / se. Pairing
    removes the prompts' own difficulty from the comparison, so it separates configs with far
    fewer prompts than two independent rates would."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be two equally long sequences of numbers, got shapes {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    mean = float(d.mean()) if n else None
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    z = mean / se if se else None
    return {"diff": mean, "diff_se": se, "z": z, "n_pairs": n}


def geneval_summary(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Alignment summary of a set of ``score_prompt`` results (one per image).

    Returns ``n_scored``, ``fully_correct`` (fraction of images with every applicable check
    passing), ``fully_correct_se`` (its binomial standard error), per check of ``CHECKS`` its pass
    rate over the images it applies to (``None`` when it applies to none) and ``n_<check>``, that
    number of images, and ``fully_correct_<k>obj`` / ``n_<k>obj`` for prompts naming k = 1, 2, 3 objects.
    """
    scores = list(scores)
    for i, s in enumerate(scores):
        if not isinstance(s, Mapping) or "fully_correct" not in s:
            raise ValueError(f"scores[{i}] must be a score_prompt result (a mapping with 'fully_correct'), got {s!r}")
    fully, n = rate(s["fully_correct"] for s in scores)
    out: dict[str, Any] = {"n_scored": n, "fully_correct": fully, "fully_correct_se": standard_error(fully, n)}
    for check in CHECKS:
        out[check], out[f"n_{check}"] = rate(s.get(check) for s in scores)
    # Fully correct by the number of objects the prompt names (GenEval reports single/two objects apart).
    for count in (1, 2, 3):
        subset = [s for s in scores if s.get("n_prompt_objects") == count]
        out[f"fully_correct_{count}obj"], out[f"n_{count}obj"] = rate(s["fully_correct"] for s in subset)
    return out


def _features(feats: np.ndarray | Sequence, name: str) -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def mean_pairwise_l2(feats: np.ndarray | Sequence) -> float | None:
    """Mean L2 distance over all unordered pairs of rows of ``feats`` (N, D); None when N < 2."""
    arr = _features(feats, "feats")
    n = len(arr)
    if n < 2:
        return None
    diff = arr[:, None, :] - arr[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    return float(dist[np.triu_indices(n, k=1)].mean())


def diversity(feats: np.ndarray | Sequence, groups: Sequence[Any]) -> tuple[float | None, int]:
    """Diversity of samples grouped by prompt: the mean over groups (prompts) with at least two
    samples of the mean pairwise L2 distance within the group.

    ``feats`` (N, D) are the samples' features and ``groups[i]`` the prompt of sample i. Returns
    (diversity, number of groups used); diversity is None when no group has two samples.
    """
    arr = _features(feats, "feats")
    if len(groups) != len(arr):
        raise ValueError(f"groups must give one group per feature row: {len(groups)} groups for {len(arr)} rows")
    members: dict[Any, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    per_group = [mean_pairwise_l2(arr[idx]) for idx in members.values() if len(idx) >= 2]
    if not per_group:
        return None, 0
    return float(np.mean(per_group)), len(per_group)


def frechet(generated: np.ndarray | Sequence, real: np.ndarray | Sequence) -> float | None:
    """Fréchet distance between Gaussians fitted to generated and real features (N, D) each
    (``frechet_distance``); None when either set has fewer than two rows."""
    gen, ref = _features(generated, "generated"), _features(real, "real")
    if len(gen) < 2 or len(ref) < 2:
        return None
    return frechet_distance(gen, ref)


# --------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    As in the standard FID code, a non-finite matrix square root is retried with ``eps`` added to
    the diagonals, and small imaginary parts from numerical error are dropped. The test suite pins
    it to torchmetrics' ``FrechetInceptionDistance`` (custom features) to 1e-6; this one stays because
    it works on stored feature arrays and costs the package no further dependency.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must be ({d}, {d}) to match the means, got {sigma.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _large_imaginary(covmean):
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if _large_imaginary(covmean):
            raise ValueError(f"sigma1/sigma2: matrix square root has imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """Matrix square root; the near-singular case is handled by the caller, so scipy's
    singularity warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def _large_imaginary(m: np.ndarray) -> bool:
    return bool(np.iscomplexobj(m) and not np.allclose(np.diagonal(m).imag, 0, atol=1e-3))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    stats = []
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2, got shape {feats.shape}")
        if not np.isfinite(feats).all():
            raise ValueError(f"{name} contains non-finite values")
        stats.append((feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])))
    if stats[0][0].shape != stats[1][0].shape:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, got "
                         f"{stats[0][0].shape[0]} and {stats[1][0].shape[0]}")
    return frechet_distance_from_stats(stats[0][0], stats[0][1], stats[1][0], stats[1][1], eps)


# --------------------------------------------------------------------------------------------
# CLIP score with a user-supplied local model


class ClipScorer:
    """CLIP score ``100 * max(cos(image, text), 0)`` with a CLIP model from a local folder.

    ``path`` must be a local transformers CLIP folder (``config.json``, safetensors weights, a
    tokenizer and an image-processor config). Nothing is downloaded; a missing or incomplete
    folder raises ``ValueError`` naming ``path`` (the ``--clip`` option).
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"--clip: CLIP model folder {str(folder)!r} does not exist (a local transformers CLIP folder is needed; nothing is downloaded)")
        weights = list(folder.glob("*.safetensors"))
        if not (folder / "config.json").is_file() or not weights:
            raise ValueError(f"--clip: {str(folder)!r} must hold config.json and *.safetensors weights of a transformers CLIPModel")
        from transformers import AutoProcessor, CLIPModel

        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ValueError(f"--clip: could not load a CLIP model from {str(folder)!r}: {exc}") from exc
        self.device = device

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        """One CLIP score per (PIL image, prompt) pair."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"images and prompts must pair up: {len(images)} images, {len(prompts)} prompts")
        if not images:
            return []
        with torch.no_grad():
            inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            out = self.model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            cos = (img * txt).sum(-1).clamp(min=0)
        return [round(100.0 * float(c), 4) for c in cos]
