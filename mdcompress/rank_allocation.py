"""How many ranks each layer gets when ``target_ratio`` sets a parameter budget: the error curves
each layer is measured by, and the allocation that spends the budget where it removes the most error.

Two measurements give each layer a curve errors[r] (r = 0..its no-saving bound):
  spectrum      the relative truncation error of its weight (of the whitened weight when the
                activation init's input statistics are given): free, read off the singular values;
  sensitivity   how far the model's predictions drift, in KL per target token on calibration pairs,
                when that layer alone is factorized at rank r (ASVD's sensitivity, Yuan et al. 2023).
``allocate_ranks`` then raises, one step at a time, the rank that removes the most error per weight
it adds, until the budget is spent.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillation.distillation_loss import IGNORE_INDEX
from matrix_decomposition import (
    DecompositionError,
    Weighting,
    count_parameters,
    low_rank_factors,
    max_saving_rank,
    singular_values,
    weights_digest,
)
from mdcompress.files import write_text_atomic
from mdcompress.progress import progress_bar
from mdcompress.teacher_forcing import teacher_forced


def check_target_ratio(model: nn.Module, names: Iterable[str], target_ratio: float) -> int:
    """Raise unless factorizing the layers ``names`` can bring ``model`` to ``target_ratio`` of its
    parameters; return the number of parameters the factorization leaves alone."""
    shapes = [tuple(model.get_submodule(name).weight.shape) for name in names]
    total = count_parameters(model)
    kept = total - sum(n * d for n, d in shapes)
    low = kept + sum(n + d for n, d in shapes)  # rank 1 everywhere
    high = kept + sum(max_saving_rank(n, d) * (n + d) for n, d in shapes)
    if not low <= target_ratio * total <= high:
        lo, hi = math.ceil(1000 * low / total) / 1000, math.floor(1000 * high / total) / 1000
        raise DecompositionError(
            f"target_ratio {target_ratio} is out of reach: factorizing these {len(shapes)} layers keeps between "
            f"{lo} (rank 1 everywhere) and {hi} (every rank at its no-saving bound) of the teacher's {total:,} "
            f"parameters; choose target_ratio in [{lo}, {hi}] or change decompose_layers")
    return kept


# ---------------------------------------------------------------------------------------------
# The error curves


def spectrum_errors(s: torch.Tensor) -> list[float]:
    """errors[r] = Σ_{i>r} σ_i²/Σ_i σ_i² for r = 0..len(s): the relative truncation error of each rank."""
    energy = s.double().square()
    tail = energy.flip(0).cumsum(0).flip(0) / energy.sum().clamp(min=1e-300)  # tail[r] = Σ_{i≥r}
    return tail.tolist() + [0.0]


def _real_token_log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Teacher-forced log-probabilities (N, V) of ``model`` at the real target positions of ``batch``."""
    logits = teacher_forced(model, batch).logits  # (B, T, V)
    return logits[batch["labels"] != IGNORE_INDEX].float().log_softmax(-1)


@torch.no_grad()
def output_drift(model: nn.Module, batches, reference: Sequence[torch.Tensor]) -> float:
    """Mean KL(reference ‖ model) per real target token over ``batches``, ``reference`` being the
    log-probabilities ``_real_token_log_probs`` gave for each batch (the unchanged model's)."""
    total, tokens = 0.0, 0
    for batch, ref in zip(batches, reference):
        log_probs = _real_token_log_probs(model, batch)
        total += F.kl_div(log_probs, ref, log_target=True, reduction="sum").item()
        tokens += ref.shape[0]
    return max(total / max(tokens, 1), 0.0)  # a KL divergence: below 0 only by rounding


@torch.no_grad()
def sensitivity_errors(model: nn.Module, names: Sequence[str], batches, points: int = 8, svd: str = "auto",
                       input_grams: Mapping[str, torch.Tensor] | None = None,
                       progress: bool = False) -> dict[str, list[float]]:
    """{name: errors} for ``allocate_ranks``: errors[r] is how far the model's output moves
    (``output_drift``: the mean KL divergence from its own unchanged predictions, per target token,
    teacher-forced on ``batches``) when that layer alone is replaced by its rank-r factorization
    (the activation-aware one for layers in ``input_grams``), for r = 0..its no-saving bound.
    Measured at rank 1 and ``points`` evenly spaced ranks up to the bound, then made convex
    (``convex_errors``). Layers are taken one at a time and restored, so ``model`` is unchanged on
    return; a shared embedding changes together with the output layer tied to it.

    This is ASVD's sensitivity-based rank search (Yuan et al., 2023) as a budget allocation, measured
    in the distillation's own currency: unlike the spectrum, it sees that the vocabulary embedding,
    cheap per singular value, is what every token passes through twice. Cost: (points + 1) forward
    passes over ``batches`` per layer; memory: the reference log-probabilities, tokens × vocabulary
    floats."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    errors: dict[str, list[float]] = {}
    try:
        reference = [_real_token_log_probs(model, batch) for batch in batches]
        if not all(torch.isfinite(ref).all() for ref in reference):
            raise DecompositionError("rank sensitivity: the teacher's log-probabilities on the calibration pairs are "
                                     "not all finite (a -inf final_logits_bias?); use rank_allocation \"spectrum\"")
        for name in progress_bar(names, desc="rank sensitivity", enabled=progress, unit="layers"):
            weight = model.get_submodule(name).weight
            n, d = weight.shape
            top = max_saving_rank(n, d)
            up, down, _ = low_rank_factors(weight.detach(), top, svd, (input_grams or {}).get(name))
            original = weight.detach().clone()
            measured = {}
            try:
                for r in sorted({1, *(math.ceil(k * top / points) for k in range(1, points + 1))}):
                    weight.copy_(up[:, :r] @ down[:r])  # the rank-r factorization's product, in place
                    measured[r] = output_drift(model, batches, reference)
                    if not math.isfinite(measured[r]):
                        raise DecompositionError(
                            f"rank sensitivity: the teacher's predictions drift by {measured[r]} with {name!r} at "
                            f"rank {r}; its outputs are not finite on the calibration pairs (use "
                            f"rank_allocation \"spectrum\")")
            finally:
                weight.copy_(original)
            errors[name] = convex_errors(measured, top)
    finally:
        model.train(was_training)
    return errors


SENSITIVITY_VERSION = "2"  # part of the key: a change of how the curves are measured invalidates stored ones


def sensitivity_key(model: nn.Module, names: Sequence[str], batches, points: int = 8, svd: str = "auto",
                    input_grams: Mapping[str, torch.Tensor] | None = None) -> str:
    """A hash of everything ``sensitivity_errors`` reads: the model's weights, the layers, the
    calibration batches, ``points``, ``svd`` and the activation init's input statistics."""
    digest = weights_digest(model, f"sensitivity {SENSITIVITY_VERSION}:{points}:{svd}:{','.join(names)}")
    for batch in batches:
        for key in sorted(batch):
            digest.update(key.encode())
            digest.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    for name in sorted(input_grams or {}):
        digest.update(name.encode())
        value = input_grams[name]
        for tensor in value.tensors() if isinstance(value, Weighting) else [value]:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def stored_sensitivity_errors(model: nn.Module, names: Sequence[str], batches, cache_dir: str | os.PathLike | None,
                              svd: str = "auto", input_grams: Mapping[str, torch.Tensor] | None = None,
                              progress: bool = False) -> tuple[dict[str, list[float]], bool]:
    """``sensitivity_errors``, kept in ``cache_dir`` (``sensitivity-<key>.json``) and read from there
    by a later run on the same model, layers and calibration pairs; returns (errors, whether read).
    Written under a temporary name and renamed: concurrent runs each write a whole file."""
    if cache_dir is None:
        return sensitivity_errors(model, names, batches, svd=svd, input_grams=input_grams, progress=progress), False
    path = Path(cache_dir) / f"sensitivity-{sensitivity_key(model, names, batches, svd=svd, input_grams=input_grams)}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, dict) and list(stored) == list(names):
            return stored, True
    except (OSError, ValueError):
        pass  # not there yet, or unreadable: measured again and rewritten
    errors = sensitivity_errors(model, names, batches, svd=svd, input_grams=input_grams, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(errors))
    return errors, False


def convex_errors(points: Mapping[int, float], max_rank: int) -> list[float]:
    """errors[r] for r = 0..max_rank from errors measured at a few ranks: made non-increasing in r
    (more rank never hurts), then read off their lower convex hull, linear between its corners, flat
    below the lowest measured rank. Convex curves are what makes the greedy allocation optimal."""
    ranks = sorted(points)
    best, pts = math.inf, []
    for r in ranks:
        best = min(best, points[r])
        pts.append((r, best))
    hull: list[tuple[int, float]] = []
    for p in pts:  # Andrew's monotone chain, lower half
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(p)
    errors = []
    for r in range(max_rank + 1):
        if r <= hull[0][0]:
            errors.append(hull[0][1])
        elif r >= hull[-1][0]:
            errors.append(hull[-1][1])
        else:
            (r0, e0), (r1, e1) = next((a, b) for a, b in zip(hull, hull[1:]) if a[0] <= r <= b[0])
            errors.append(e0 + (e1 - e0) * (r - r0) / (r1 - r0))
    return errors


# ---------------------------------------------------------------------------------------------
# The allocation


def allocate_ranks(layers: Mapping[str, tuple[int, int, Sequence[float]]], budget: int) -> dict[str, int]:
    """Ranks minimizing Σ_layers errors[r] with Σ r·(n+d) ≤ ``budget`` and 1 ≤ r ≤ max_saving_rank(n, d).

    ``layers`` maps a name to (n, d, errors), errors[r] being the layer's cost at rank r
    (``spectrum_errors``: the relative truncation error; ``sensitivity_errors``: the KL drift of the
    model's predictions on calibration pairs). Greedy: start at rank 1 and keep raising the rank that
    removes the most error per weight it adds, (errors[r] − errors[r+1]) / (n+d). For convex curves
    (each layer's gains only shrink with r) this is the optimal allocation up to the last few
    weights of the budget, and exactly optimal when all layers have the same n+d."""
    ranks = {name: 1 for name in layers}
    left = budget - sum(n + d for n, d, _ in layers.values())
    if left < 0:
        raise DecompositionError(f"the budget of {budget:,} weights is below rank 1 everywhere "
                                 f"({budget - left:,} weights)")
    top = {name: min(max_saving_rank(n, d), len(errors) - 1) for name, (n, d, errors) in layers.items()}

    def entry(name: str, i: int):
        n, d, errors = layers[name]
        r = ranks[name]
        return (-(errors[r] - errors[r + 1]) / (n + d), i, name)

    heap = [entry(name, i) for i, name in enumerate(layers) if top[name] > 1]
    heapq.heapify(heap)
    while heap:
        _, i, name = heapq.heappop(heap)
        n, d, _ = layers[name]
        if n + d > left:
            continue  # this layer no longer fits; cheaper ones may
        ranks[name] += 1
        left -= n + d
        if ranks[name] < top[name]:
            heapq.heappush(heap, entry(name, i))
    return ranks


def ranks_for_ratio(model: nn.Module, names: Iterable[str], target_ratio: float,
                    input_grams: Mapping[str, torch.Tensor] | None = None,
                    errors: Mapping[str, Sequence[float]] | None = None) -> dict[str, int]:
    """Ranks for the layers ``names`` such that the factorized model keeps at most ``target_ratio``
    of ``model``'s parameters (all of them: embeddings, biases and norms included), as close to
    it as the ranks allow, with the least total error (``allocate_ranks``): the given per-layer
    ``errors`` curves, else the relative truncation error of each spectrum (the whitened one when
    ``input_grams`` are given)."""
    names = list(names)
    kept = check_target_ratio(model, names, target_ratio)
    weights = {name: model.get_submodule(name).weight for name in names}
    if errors is None:
        errors = {name: spectrum_errors(singular_values(w, (input_grams or {}).get(name))) for name, w in weights.items()}
    layers = {name: (*w.shape, errors[name]) for name, w in weights.items()}
    return allocate_ranks(layers, math.floor(target_ratio * count_parameters(model)) - kept)
