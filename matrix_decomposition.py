"""The low-rank layer, the surgery that swaps it into a model, and saving/loading the result.

A weight W (n×d) of an ``nn.Linear`` is replaced by its truncated SVD, W ≈ B'·C' with
B' (n×r) and C' (r×d), implemented as two smaller linears: C' (d→r, no bias) then B'
(r→n, carrying the original bias). The layer then holds r·(n+d) weights instead of n·d,
which only saves anything while r < n·d/(n+d). The shared embedding table E (V×d) can be
factorized the same way, E ≈ A·B (``LowRankEmbedding``), with its tied output projection reusing A and B.

Activation-aware initialization (SVD-LLM, Wang et al. 2024, arXiv:2403.07378): given the Gram
matrix G = XᵀX (d×d) of the inputs X the layer sees, the factors minimize the output error
‖(W − B'C')Xᵀ‖_F instead of ‖W − B'C'‖_F. With G = L·Lᵀ (Cholesky), ‖(W − B'C')Xᵀ‖_F =
‖(W − B'C')L‖_F, minimized by B'·C' = U_r·U_rᵀ·W where U_r are the top r left singular vectors
of W·L (B' = U_r, C' = U_rᵀ·W, each rank-one term then rescaled so both factors have the same norm).

A token embedding E (V×d) sees no input to take a Gram matrix of; what its errors cost is how often
each token is looked up and, through the tied output projection (logits = h·Eᵀ), the Gram matrix
G of the decoder states h. Its activation-aware factors minimize ‖D·(E − A·B)·L‖_F (``Weighting``):
D = diag(√(c_t + c̄)) weighs each token's row by its count c_t in the calibration pairs (smoothed by
the mean count c̄, so unseen tokens keep a share), and L·Lᵀ = G/N + mean(diag G/N)·I weighs the
logit error (h·δ_t)² and the input vector's own error alike. A token's logit error costs in
proportion to how likely the token is (the softmax's curvature), about its frequency: both terms
share D. The minimizer is A·B = D⁻¹·U_r·U_rᵀ·D·E with U_r the top r left singular vectors of D·E·L.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, MarianConfig
from mdcompress.errors import DecompositionError
from mdcompress.files import chmod_as_umask

WEIGHTS_NAME = "model.safetensors"  # a dense model's weights (a factorized one's too, in older folders)
# A factorized model's weights: transformers' "low_rank" variant name, which only the low-rank model classes
# ask for. A plain class (``MarianMTModel.from_pretrained``) finds no model.safetensors and raises, instead of
# building a dense model around randomly initialized layers with one warning among many.
LOW_RANK_VARIANT = "low_rank"
LOW_RANK_WEIGHTS_NAME = f"model.{LOW_RANK_VARIANT}.safetensors"
CONFIG_FIELD = "matrix_decomposition"  # where the per-layer ranks live in the saved model config



@dataclass(frozen=True)
class Weighting:
    """Which errors of a factorization W ≈ Ŵ (W n×d) cost most: Ŵ minimizes ‖diag(rows)·(W − Ŵ)·L‖_F,
    with L·Lᵀ = ``gram`` (d×d; None: L = I) and ``rows`` (n,) positive weights (None: all 1).
    A token embedding's activation-aware init (``calibration.embedding_weighting``); a linear's is a plain Gram."""
    gram: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gram, self.rows) if t is not None]


class LowRankLinear(nn.Module):
    """A linear layer whose weight is the product of two factors: y = B'(C'x) + b.

    ``down`` is C' (r×d, no bias) and ``up`` is B' (n×r, with the original bias b), so
    W ≈ B'·C' where W is the n×d weight of the ``nn.Linear(d, n)`` it replaces.

    ``from_linear`` fills the factors from the truncated SVD W ≈ U_r·diag(S_r)·V_rᵀ and splits
    the singular values evenly: B' = U_r·diag(√S_r), C' = diag(√S_r)·V_rᵀ. Either split gives
    the same product; the even one gives both factors the same scale (‖B'‖_F = ‖C'‖_F), so
    during recovery training neither factor's gradients dwarf the other's, and neither holds
    values far outside the range of the original weights (which matters in half precision).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # C'
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # B'
        self.init_note: str | None = None  # why an activation-aware init fell back to plain SVD

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, svd: str = "auto",
                    input_gram: torch.Tensor | None = None) -> "LowRankLinear":
        """The rank-``rank`` factorization of ``linear`` (left unchanged). With ``input_gram``
        (XᵀX of the layer's inputs, d×d) the activation-aware one; if that matrix is unusable the
        plain SVD is used and ``init_note`` says why."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        up, down, module.init_note = low_rank_factors(weight, rank, svd, input_gram)  # (n, r), (r, d)
        with torch.no_grad():
            module.up.weight.copy_(up)
            module.down.weight.copy_(down)
            if linear.bias is not None:
                module.up.bias.copy_(linear.bias)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The n×d product B'·C' (for inspection; ``forward`` never builds it)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        bias = self.up.bias() if callable(self.up.bias) else self.up.bias  # a method once quantized
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={bias is not None}")


class LowRankEmbedding(nn.Module):
    """An embedding table factorized as E ≈ A·B: a token's vector is its row of A (V×r) times B (r×d).

    ``up`` is an ``nn.Embedding(V, r)`` holding A; ``down`` holds B (r×d) as the weight of an
    ``nn.Linear(d, r)``, the layout of the first factor of a ``LowRankLinear``. A tied output
    projection (Marian's ``lm_head``, logits = h·Eᵀ) becomes a ``LowRankLinear`` whose ``up`` and
    ``down`` weights are these very tensors: logits = (h·Bᵀ)·Aᵀ, one set of factor parameters.
    ``embed_scale`` is the factor a scaled word embedding (NLLB/M2M100, mBART, BART: √d or 1)
    multiplies its vectors by; None for a plain ``nn.Embedding`` (Marian, T5).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 device=None, dtype=None, embed_scale: float | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx, self.embed_scale = padding_idx, embed_scale
        self.up = nn.Embedding(num_embeddings, rank, padding_idx, device=device, dtype=dtype)  # A (V, r)
        self.down = nn.Linear(embedding_dim, rank, bias=False, device=device, dtype=dtype)  # B (r, d)
        self.init_note: str | None = None

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int, svd: str = "auto",
                       weighting: Weighting | None = None) -> "LowRankEmbedding":
        """The rank-``rank`` truncated-SVD factorization of ``embedding`` (left unchanged); with
        ``weighting`` (``calibration.embedding_weighting``) the activation-aware one, else the plain SVD."""
        weight = embedding.weight.detach()  # (V, d)
        module = cls(embedding.num_embeddings, embedding.embedding_dim, rank, embedding.padding_idx,
                     device=weight.device, dtype=weight.dtype, embed_scale=getattr(embedding, "embed_scale", None))
        up, down, module.init_note = low_rank_factors(weight, rank, svd, weighting)  # (V, r), (r, d)
        with torch.no_grad():
            module.up.weight.copy_(up)
            module.down.weight.copy_(down)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The V×d product A·B (for inspection; ``forward`` never builds it)."""
        return self.up.weight @ self.down.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vectors = self.up(input_ids) @ self.down.weight  # (…, r) @ (r, d) → (…, d)
        return vectors if self.embed_scale is None else vectors * self.embed_scale

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}{scale}"


LOW_RANK = (LowRankLinear, LowRankEmbedding)


def max_saving_rank(out_features: int, in_features: int) -> int:
    """The largest rank r with r·(n+d) < n·d, i.e. the last one that still saves weights."""
    return math.ceil(out_features * in_features / (out_features + in_features)) - 1


def low_rank_parameters(out_features: int, in_features: int, rank: int, bias: bool = True) -> int:
    return rank * (out_features + in_features) + (out_features if bias else 0)


def truncated_svd(weight: torch.Tensor, rank: int, method: str = "auto"):
    """U (n×r), S (r,), Vᵀ (r×d) of the best rank-``rank`` approximation of ``weight``.

    ``exact`` runs a full LAPACK SVD; ``lowrank`` runs a randomized SVD (Halko et al.,
    ``torch.svd_lowrank``) with oversampling and power iterations, much faster when r is a
    small part of min(n, d) and accurate to well below the truncation error for the decaying
    spectra of trained weights. ``auto`` takes the randomized one for large matrices at low rank.
    Computed in float32 at least, returned in the weight's dtype.
    """
    if method not in ("auto", "exact", "lowrank"):
        raise DecompositionError(f"svd method {method!r} is not one of 'auto', 'exact', 'lowrank'")
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    small = min(w.shape)
    if method == "auto":
        method = "lowrank" if small >= 256 and rank <= small // 4 else "exact"
    wide = w.shape[0] < w.shape[1]
    if wide:  # LAPACK is about twice as fast on the tall orientation: factor Wᵀ, transpose back
        w = w.T
    if method == "lowrank" and rank + 10 < small:
        with torch.random.fork_rng(devices=[]):  # its random projection neither reads nor moves the global RNG
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, q=rank + 10, niter=4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if wide:
        u, vh = vh.T, u.T
    return u.to(weight.dtype).contiguous(), s.to(weight.dtype), vh.to(weight.dtype).contiguous()


def low_rank_factors(weight: torch.Tensor, rank: int, svd: str = "auto",
                     input_gram: torch.Tensor | Weighting | None = None):
    """B' (n×r), C' (r×d) with W ≈ B'·C', in the weight's dtype, and a note: None, or why the
    activation-aware factorization asked for (``input_gram`` given: the Gram matrix XᵀX of the
    inputs, or a ``Weighting``) fell back to the plain SVD. The factors of rank r are the first r
    of those of any higher rank (the rank sensitivity relies on it)."""
    rows, root_gram, note = _weights(input_gram, weight.shape[0])
    if input_gram is not None and note is None:
        # D·B'·C' = U_r·U_rᵀ·D·W with U_r the top left singular vectors of D·W·L: no inverse of L needed
        w = weight.double()
        scaled = w if rows is None else rows.to(w.device)[:, None] * w  # D·W
        whitened = scaled if root_gram is None else scaled @ root_gram.to(w.device)
        u, _, _ = truncated_svd(whitened, rank, method=svd)  # (n, r)
        up = u if rows is None else u / rows.to(w.device)[:, None]
        up, down = _balance(up, u.T @ scaled)  # (n, r), (r, d)
        return up.to(weight.dtype), down.to(weight.dtype), None
    u, s, vh = truncated_svd(weight, rank, method=svd)  # (n, r), (r,), (r, d)
    root = s.sqrt()
    return u * root, root[:, None] * vh, note  # B' = U·√S, C' = √S·Vᵀ


def _balance(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one term b_i·c_iᵀ of B'·C' so that ‖b_i‖ = ‖c_i‖ (the product is unchanged).
    The activation-aware factors start as B' = U_r (unit columns) and C' = U_rᵀ·W, whose scales
    differ; balanced, both factors sit in the range of the original weights."""
    scale = (down.norm(dim=1) / up.norm(dim=0)).sqrt()  # (r,)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return up * scale, down / scale[:, None]


def _weights(input_gram: torch.Tensor | Weighting | None, n: int):
    """(D's diagonal or None, L or None, note) for a weight of ``n`` rows: ``input_gram`` (XᵀX or a
    ``Weighting``) resolved into the row weights and the root of the Gram matrix, with why they
    cannot be used (None when they can, or when nothing was asked for)."""
    if input_gram is None:
        return None, None, None
    weighting = input_gram if isinstance(input_gram, Weighting) else Weighting(gram=input_gram)
    root_gram, note = whitening(weighting.gram) if weighting.gram is not None else (None, None)
    rows, row_note = _row_weights(weighting.rows, n)
    return rows, root_gram, note or row_note


def _row_weights(rows: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, str | None]:
    """(rows as float64, None), or (None, why they cannot be used)."""
    if rows is None:
        return None, None
    r = rows.detach().double().flatten()
    if r.numel() != n:
        return None, f"{r.numel()} row weights for a weight of {n} rows; plain SVD used"
    if not (torch.isfinite(r).all() and (r > 0).all()):
        return None, "the row weights are not all finite and positive (no calibration token counted?); plain SVD used"
    return r, None


JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1, 1.0)  # λ tried in turn, relative to mean(diag G)


def whitening(gram: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """(L, None) with L·Lᵀ = G + λ·mean(diag G)·I, L lower-triangular float64, for the first λ of
    ``JITTERS`` at which the Cholesky factorization succeeds (a rank-deficient G needs λ > 0);
    (None, why) when G is zero, not finite or not positive semi-definite even with the jitter."""
    g = gram.detach().double()
    if not torch.isfinite(g).all():
        return None, "the input Gram matrix has non-finite entries; plain SVD used"
    g = (g + g.T) / 2
    scale = g.diagonal().mean().item()
    if not g.any():
        return None, "the input Gram matrix is zero (no calibration input reached the layer); plain SVD used"
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for jitter in JITTERS if scale > 0 else ():
        root, info = torch.linalg.cholesky_ex(g + jitter * scale * eye)
        if info.item() == 0 and torch.isfinite(root).all() and root.diagonal().min() > 0:
            return root, None
    return None, "the input Gram matrix is not positive semi-definite, even with jitter; plain SVD used"


def singular_values(weight: torch.Tensor, input_gram: torch.Tensor | Weighting | None = None) -> torch.Tensor:
    """All singular values (float64, descending) of W, or of the whitened W·L (D·W·L for a
    ``Weighting``) when a usable ``input_gram`` = L·Lᵀ is given (the spectrum the activation-aware
    init truncates)."""
    rows, root_gram, note = _weights(input_gram, weight.shape[0])
    if input_gram is None or note:
        return torch.linalg.svdvals(weight.detach().float()).double()
    w = weight.detach().double()
    w = w if rows is None else rows[:, None] * w
    return torch.linalg.svdvals(w if root_gram is None else w @ root_gram)


# ---------------------------------------------------------------------------------------------
# Which layers, at which ranks


def module_name(key: str) -> str:
    """State-dict key as users write it → module name (``…fc1.weight`` / ``…fc1.bias`` → ``…fc1``)."""
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


SUPPORTED = ("encoder-decoder models (AutoModelForSeq2SeqLM) whose attention and feed-forward layers are "
             "nn.Linear: MarianMT, NLLB-200/M2M100, mBART/mBART-50, BART, T5/mT5/MADLAD-400")


def encoder_and_decoder(model: nn.Module) -> list[nn.Module | None]:
    """What ``model.get_encoder()`` and ``model.get_decoder()`` return (None for a missing method)."""
    return [getattr(model, method)() if callable(getattr(model, method, None)) else None
            for method in ("get_encoder", "get_decoder")]


def layer_stacks(model: nn.Module) -> list[str]:
    """Names of the module lists holding the encoder's and the decoder's layers (Marian's
    ``model.encoder.layers``, T5's ``encoder.block``…): found by structure, not by name, as the
    outermost ``nn.ModuleList`` inside what ``get_encoder()`` and ``get_decoder()`` return."""
    stacks = encoder_and_decoder(model)
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or any(stack is None or stack is model for stack in stacks):
        kind = getattr(config, "model_type", type(model).__name__)
        raise DecompositionError(f"{kind} ({type(model).__name__}) is not an encoder-decoder model; "
                                 f"supported: {SUPPORTED}")
    names = {id(module): name for name, module in model.named_modules()}
    lists = []
    for stack in stacks:
        prefix = names[id(stack)]
        for name, module in stack.named_modules(prefix=prefix):
            if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in lists):
                lists.append(name)
    return lists


def check_supported(model: nn.Module) -> None:
    """Raise a one-line ``DecompositionError`` unless ``model`` is an encoder-decoder whose layers'
    projections are ``nn.Linear`` (GPT-2-style ``Conv1D`` layers hold their weight transposed)."""
    stacks = layer_stacks(model)
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and any(name.startswith(f"{stack}.") for stack in stacks):
            raise DecompositionError(f"{type(model).__name__}: {name} is a Conv1D layer (GPT-2 style), not an "
                                     f"nn.Linear; supported: {SUPPORTED}")


def default_targets(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the encoder and decoder layers (attention projections and
    feed-forward layers, whatever the model calls them, ``layer_stacks``): not the embeddings, not
    T5's relative attention bias, not the output projection."""
    check_supported(model)
    stacks = tuple(f"{stack}." for stack in layer_stacks(model))
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, LowRankLinear)) and name.startswith(stacks)
            and not _inside_low_rank(model, name)]


def word_embeddings(model: nn.Module) -> list[nn.Module]:
    """The token embedding tables of ``model`` (what ``get_input_embeddings()`` of the model, its
    encoder and its decoder return), each once: not positional embeddings, not T5's relative
    attention bias. An embedding tied to one of these (the same tensor) is the same table."""
    found = []
    for owner in (model, *encoder_and_decoder(model)):
        try:
            embedding = owner.get_input_embeddings() if owner is not None else None
        except (AttributeError, NotImplementedError):  # a module without token embeddings
            embedding = None
        if isinstance(embedding, nn.Embedding) and all(embedding.weight is not e.weight for e in found):
            found.append(embedding)
    return found


def _factorizable_embedding(module: nn.Module) -> bool:
    """A plain ``nn.Embedding`` or a scaled word embedding (its vectors times ``embed_scale``), the
    two a ``LowRankEmbedding`` computes; other subclasses compute something else."""
    return type(module) is nn.Embedding or (isinstance(module, nn.Embedding)
                                             and isinstance(getattr(module, "embed_scale", None), (int, float)))


def _inside_low_rank(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a factor (``….up`` / ``….down``) of a ``LowRankLinear`` or ``LowRankEmbedding``."""
    parent, _, _ = name.rpartition(".")
    return bool(parent) and isinstance(model.get_submodule(parent), LOW_RANK)


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name → the other names the same tensor goes by (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names}


def canonical_name(model: nn.Module, param_name: str) -> str:
    """The name a (possibly tied) parameter goes by first, e.g. ``model.shared.weight`` for
    Marian's ``lm_head.weight`` and ``model.encoder.embed_tokens.weight``."""
    return min([param_name, *_tied_names(model).get(param_name, [])], key=_parameter_order(model).get)


def _parameter_order(model: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}


def decomposable_keys(model: nn.Module) -> list[str]:
    """The weight keys ``decompose_layers`` accepts: every untied ``nn.Linear`` not yet factorized
    (an untied ``lm_head`` included), and every token embedding table under the name its (tied)
    weight goes by first (``model.shared.weight``, T5's ``shared.weight``)."""
    tied = _tied_names(model)
    words = {id(m.weight) for m in word_embeddings(model)}
    keys = []
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if _inside_low_rank(model, name):
            continue  # a factor of a layer already decomposed
        if isinstance(module, nn.Linear) and not tied.get(key):
            keys.append(key)
        elif _word_embedding(module, words) and canonical_name(model, key) == key:
            keys.append(key)
    return keys


def _word_embedding(module: nn.Module, words: set[int]) -> bool:
    return _factorizable_embedding(module) and id(module.weight) in words


def _token_embedding_key(model: nn.Module) -> str:
    """The key ``decompose_layers`` takes for the token embedding (``model.shared.weight``), for messages."""
    keys = [k for k in decomposable_keys(model) if isinstance(model.get_submodule(module_name(k)), nn.Embedding)]
    return keys[0] if keys else "none here"


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


def expand_patterns(model: nn.Module, layers: Iterable[str], key: str = "decompose_layers") -> list[str]:
    """``layers`` with each shell-style pattern (``*``, ``?``, ``[…]``; ``*`` also crosses dots)
    replaced by the ``decomposable_keys`` it matches, in model order; a pattern matching none is an error
    (naming ``key``, the config key the layers came from)."""
    expanded: list[str] = []
    candidates = None
    config_key = key
    for key in layers:
        if not _is_pattern(key):
            expanded.append(key)
            continue
        if candidates is None:  # a pattern may name the weights or the biases of the layers
            weights = decomposable_keys(model)
            candidates = {**{k: k for k in weights}, **{f"{k[:-len('weight')]}bias": k for k in weights}}
        matched = list(dict.fromkeys(candidates[k] for k in fnmatch.filter(candidates, key)))
        if not matched:
            hint = f" (they look like {next(iter(candidates))!r})" if candidates else " (it has none left to decompose)"
            raise DecompositionError(f"{config_key}: the pattern {key!r} matches no nn.Linear or embedding "
                                     f"weight of this model{hint}")
        expanded.extend(matched)
    return expanded


def resolve_ranks(model: nn.Module, layers: Iterable[str] | None,
                  k_info: int | Mapping[str, int]) -> dict[str, int]:
    """Check the layers and ranks a user asked for; return {module name: rank} in model order.

    ``layers`` are state-dict keys (``….weight`` or ``….bias``; duplicates are harmless) or patterns
    (``expand_patterns``: ``"model.decoder.*"``, ``"*fc?.weight"``). Empty:
    the keys of ``k_info`` when it is a mapping without ``"default"``, else every default target.
    ``k_info`` is one rank for all, or {key or pattern: rank} with an optional ``"default"`` entry;
    a layer takes the rank of its own key, else of the first pattern that matches it, else the default.
    """
    layers = [layers] if isinstance(layers, str) else list(layers or [])
    per_layer = dict(k_info) if isinstance(k_info, Mapping) else None
    source = "decompose_layers"  # the config key the layers come from, for messages
    if not layers:
        if per_layer and "default" not in per_layer:
            layers, source = [k for k in per_layer if k != "default"], "k_info"  # its keys name the layers
        else:
            layers = default_targets(model)
        if not layers:
            raise DecompositionError("decompose_layers is empty and the model has no nn.Linear inside "
                                     "its encoder/decoder layers to decompose by default")

    layers = expand_patterns(model, layers, source)
    state_keys = list(model.state_dict().keys())
    modules = dict(model.named_modules())
    tied = _tied_names(model)
    words = {id(m.weight) for m in word_embeddings(model)}
    names: list[str] = []
    for key in layers:
        name = module_name(key)
        module = modules.get(name) if name else None
        if key in state_keys and not key.endswith((".weight", ".bias")):
            raise DecompositionError(f"{source}: {key!r} is a buffer, not the weight of an nn.Linear")
        if module is None or not (f"{name}.weight" in state_keys or f"{name}.bias" in state_keys
                                  or isinstance(module, LOW_RANK)):
            close = difflib.get_close_matches(key, state_keys, n=3, cutoff=0.5)
            hint = f"; closest keys: {', '.join(close)}" if close else ""
            raise DecompositionError(f"{source}: {key!r} is not a key of this model's state dict{hint}")
        if isinstance(module, LOW_RANK):
            raise DecompositionError(f"{source}: {key!r} is already decomposed (rank {module.rank})")
        if _inside_low_rank(model, name):
            raise DecompositionError(f"{source}: {key!r} is a factor of the already decomposed layer "
                                     f"{name.rpartition('.')[0]!r}")
        canonical = canonical_name(model, f"{name}.weight")  # the name its tied weight goes by first
        if _word_embedding(module, words) and canonical == f"{name}.weight":
            pass  # a token embedding table (with every module tied to it) is factorized as a whole
        elif not isinstance(module, nn.Linear):
            example = next(iter(default_targets(model)), "an attention projection")
            also = (f"; the embedding it shares its weight with is factorized as {canonical}"
                    if _word_embedding(module, words) else
                    f"; of the embeddings, only the token embedding can be ({_token_embedding_key(model)})"
                    if isinstance(module, nn.Embedding) else "")
            raise DecompositionError(
                f"{source}: {key!r} belongs to a module of type {type(module).__name__}, not an nn.Linear; "
                f"only nn.Linear weights can be decomposed (e.g. {example}.weight){also}")
        elif tied.get(f"{name}.weight"):
            raise DecompositionError(
                f"{source}: {key!r} is tied to {tied[f'{name}.weight'][0]!r} (shared embedding); "
                f"factorizing it alone would untie the two; list {canonical!r} to factorize them together")
        if name not in names:
            names.append(name)

    if per_layer is not None:
        given = {module_name(k): v for k, v in per_layer.items() if k != "default" and not _is_pattern(k)}
        for name in given:
            if name not in names:
                raise DecompositionError(f"k_info: {name!r} has a rank but is not in decompose_layers")
        for pattern, rank in per_layer.items():
            if not _is_pattern(pattern):
                continue
            matched = [name for name in names
                       if fnmatch.fnmatchcase(f"{name}.weight", pattern) or fnmatch.fnmatchcase(f"{name}.bias", pattern)
                       or fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise DecompositionError(f"k_info: the pattern {pattern!r} matches none of the layers to decompose "
                                         f"(they look like {names[0] + '.weight'!r})")
            for name in matched:
                given.setdefault(name, rank)
    ranks: dict[str, int] = {}
    for name in names:
        if per_layer is None:
            rank = k_info
        elif name in given:
            rank = given[name]
        elif "default" in per_layer:
            rank = per_layer["default"]
        else:
            raise DecompositionError(f"k_info: no rank for {name!r}; give it one or add a \"default\" entry")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise DecompositionError(f"k_info: rank for {name!r} must be a whole number, got {rank!r}")
        n, d = modules[name].weight.shape
        bound = max_saving_rank(n, d)
        if rank < 1:
            raise DecompositionError(f"k_info: rank {rank} for {name!r} must be at least 1")
        if rank > bound:
            raise DecompositionError(
                f"k_info: rank {rank} for {name!r} saves nothing: it must be at most {bound} "
                f"(below {n}·{d}/({n}+{d}) = {n * d / (n + d):.1f})")
        ranks[name] = rank
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(ranks.items(), key=lambda item: order[item[0]]))


# ---------------------------------------------------------------------------------------------
# Surgery


def _replace_(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def decompose_(model: nn.Module, layers: Iterable[str] | None = None, k_info: int | Mapping[str, int] = 64,
               svd: str = "auto", input_grams: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Replace the chosen ``nn.Linear`` layers of ``model``, in place, by their rank-``k_info`` SVD
    factorizations. Returns {module name: rank} and records it in ``model.config`` (if any).

    ``input_grams`` ({module name: XᵀX}, for a token embedding its ``Weighting``) asks for the
    activation-aware factorization of every chosen layer; ``init_notes(model)`` then lists the
    layers that fell back to plain SVD."""
    return factorize_(model, resolve_ranks(model, layers, k_info), svd=svd, input_grams=input_grams)


def factorize_(model: nn.Module, ranks: Mapping[str, int], svd: str = "auto",
               input_grams: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """``decompose_`` with the layers and ranks already resolved (``resolve_ranks``: {module name:
    rank}, in model order), as a run resolves them once and passes them on."""
    ranks = dict(ranks)
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        gram = None if input_grams is None else input_grams.get(name)
        if isinstance(layer, nn.Embedding):
            module = LowRankEmbedding.from_embedding(layer, rank, svd=svd, weighting=gram)
            if input_grams is not None and gram is None:
                module.init_note = "no token counts were gathered for it; plain SVD used"
            _replace_embedding_(model, layer, module)
            continue
        module = LowRankLinear.from_linear(layer, rank, svd=svd, input_gram=gram)
        if input_grams is not None and gram is None:
            module.init_note = "no input Gram matrix was gathered for it; plain SVD used"
        _replace_(model, name, module)
    _record_ranks(model)
    return ranks


def _replace_embedding_(model: nn.Module, embedding: nn.Embedding, new: LowRankEmbedding) -> None:
    """Swap ``new`` in for ``embedding`` and for every module tied to it: other embeddings become
    ``new`` itself, a tied output projection a ``LowRankLinear`` made of ``new``'s own factors;
    then point Hugging Face's tied-weight mappings at the factors (so ``tie_weights()`` keeps them tied).
    Tied means the same tensor, or tied by the model's mapping: ``from_pretrained`` builds the model
    untied and ties it only once the weights are loaded."""
    names = {f"{name}.weight" for name, m in model.named_modules(remove_duplicate=False) if m is embedding}
    by_mapping = {target for target, source in getattr(model, "all_tied_weights_keys", {}).items() if source in names}
    tied = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (nn.Embedding, nn.Linear))
            and (m.weight is embedding.weight or f"{name}.weight" in by_mapping)]
    for name, module in tied:
        if isinstance(module, nn.Embedding):
            _replace_(model, name, new)
            continue
        head = LowRankLinear(module.in_features, module.out_features, new.rank, bias=module.bias is not None,
                             device="meta")  # every tensor is replaced by a shared one just below
        head.up.weight, head.down.weight = new.up.weight, new.down.weight  # A (V, r), B (r, d): shared
        if module.bias is not None:
            head.up.bias = module.bias
        _replace_(model, name, head)
    _retie_mappings_(model)


def _retie_mappings_(model: nn.Module) -> None:
    """Rewrite each Hugging Face ``_tied_weights_keys`` ({target: source}) entry whose weights were
    factorized into one entry per factor (``….weight`` → ``….up.weight`` and ``….down.weight``)."""
    for _, sub in model.named_modules():
        mapping = getattr(sub, "_tied_weights_keys", None)
        if not isinstance(mapping, dict) or not hasattr(sub, "get_expanded_tied_weights_keys"):
            continue

        def factors(key: str, sub=sub) -> list[str] | None:
            owner, _, _ = key.rpartition(".")
            try:
                module = sub.get_submodule(owner)
            except AttributeError:
                return None
            return [f"{owner}.up.weight", f"{owner}.down.weight"] if isinstance(module, LOW_RANK) else None

        new = {}
        for target, source in mapping.items():
            target_factors, source_factors = factors(target), factors(source)
            if target_factors and source_factors:
                new.update(zip(target_factors, source_factors))
            elif not target_factors and not source_factors:
                new[target] = source
        sub._tied_weights_keys = new
    for _, sub in model.named_modules():
        if hasattr(sub, "get_expanded_tied_weights_keys"):
            sub.all_tied_weights_keys = sub.get_expanded_tied_weights_keys(all_submodels=True)


def _untie_(model: nn.Module, names: Sequence[str]) -> None:
    """Give each linear of ``names`` a weight of its own, out of Hugging Face's tied-weight mappings."""
    keys = {f"{name}.weight" for name in names}
    for name in names:
        module = model.get_submodule(name)
        module.weight = nn.Parameter(module.weight.detach().clone())
    prefixes = {id(sub): f"{prefix}." if prefix else "" for prefix, sub in model.named_modules()}
    for _, sub in model.named_modules():
        mapping = getattr(sub, "_tied_weights_keys", None)
        if isinstance(mapping, dict):
            sub._tied_weights_keys = {t: s for t, s in mapping.items() if prefixes[id(sub)] + t not in keys}
    _retie_mappings_(model)


def _untie_saved_apart_(model: nn.Module, weights: Path) -> None:
    """Untie each linear that the freshly built model ties to another tensor while the weights file
    holds both apart: mT5's and MADLAD's dense ``lm_head`` (transformers 5 builds T5 models tied,
    whatever their config says, and unties them only when a checkpoint holds two different tables)."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        saved = set(f.keys())
    tied = _tied_names(model)
    apart = [key.removesuffix(".weight") for key in saved
             if key.endswith(".weight") and any(other in saved for other in tied.get(key, []))
             and isinstance(model.get_submodule(key.removesuffix(".weight")), nn.Linear)]
    if apart:
        _untie_(model, apart)


def init_notes(model: nn.Module) -> dict[str, str]:
    """{module name: why its activation-aware init fell back to plain SVD} (empty when none did)."""
    return {name: m.init_note for name, m in model.named_modules() if isinstance(m, LOW_RANK) and m.init_note}


def apply_low_rank_structure_(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Swap in empty ``LowRankLinear`` modules of the given ranks (to load saved factors into). A
    linear with a rank of its own that the freshly built model ties to the embedding (mT5's and
    MADLAD's ``lm_head``: transformers builds T5 models tied and unties them only when the checkpoint
    holds two different tables) is untied first."""
    linears = [name for name in ranks if isinstance(model.get_submodule(name), nn.Linear)]
    if any(_tied_names(model).get(f"{name}.weight") for name in linears):
        _untie_(model, linears)
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        if _factorizable_embedding(layer):
            w = layer.weight
            _replace_embedding_(model, layer, LowRankEmbedding(layer.num_embeddings, layer.embedding_dim, rank,
                                                               layer.padding_idx, w.device, w.dtype,
                                                               getattr(layer, "embed_scale", None)))
        elif isinstance(layer, nn.Linear):
            w = layer.weight
            _replace_(model, name, LowRankLinear(layer.in_features, layer.out_features, rank,
                                                 bias=layer.bias is not None, device=w.device, dtype=w.dtype))
        else:
            raise DecompositionError(f"saved rank for {name!r}, which is a {type(layer).__name__}, "
                                     f"not an nn.Linear or nn.Embedding")
    _record_ranks(model)


def low_rank_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: rank} of the factorized layers; an output projection made of an embedding's
    factors is part of that embedding, not a layer of its own."""
    shared = {id(m.up.weight) for m in model.modules() if isinstance(m, LowRankEmbedding)}
    return {name: m.rank for name, m in model.named_modules()
            if isinstance(m, LowRankEmbedding) or (isinstance(m, LowRankLinear) and id(m.up.weight) not in shared)}


def _record_ranks(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_FIELD, {"format": 1, "ranks": low_rank_ranks(model)})


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied tensors counted once), trainable or not."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The factorized architecture for the transformers Auto classes (registered on import; no remote code)


LOW_RANK_SUFFIX = "_low_rank"  # model_type of a factorized model: its base type + this ("marian_low_rank")
FAMILIES = ("marian", "m2m_100", "mbart", "bart", "t5", "mt5")  # registered on import (NLLB-200 is m2m_100)
_LOW_RANK_CLASSES: dict[str, tuple[type, type]] = {}


def low_rank_classes(base_config_class: type) -> tuple[type, type]:
    """(config class, model class) of the factorized variant of a seq2seq architecture, made and
    registered with the Auto classes on first use: the config is the base config class under the
    ``model_type`` ``<base>_low_rank`` (so plain transformers refuses the folder instead of taking it
    for a dense model whose factorized layers it would leave randomly initialized), and the model
    is the base ``…ForConditionalGeneration`` with the factorization recorded in its config applied
    (``apply_low_rank_structure_``) as it is built, before its weights are loaded."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    base_type = base_config_class.model_type.removesuffix(LOW_RANK_SUFFIX)  # a low-rank class: its own
    if base_type not in _LOW_RANK_CLASSES:
        base_model_class = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING[base_config_class]
        config_class = type(f"LowRank{base_config_class.__name__}", (base_config_class,), {
            "model_type": f"{base_type}{LOW_RANK_SUFFIX}", "__module__": __name__,
            "__doc__": f"A ``{base_config_class.__name__}`` whose ``{CONFIG_FIELD}`` entry holds the per-layer ranks."})

        def __init__(self, config):
            base_model_class.__init__(self, config)
            apply_low_rank_structure_(self, (getattr(config, CONFIG_FIELD, None) or {}).get("ranks", {}))

        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            """``from_pretrained`` reading ``LOW_RANK_WEIGHTS_NAME`` (older folders: ``WEIGHTS_NAME``)."""
            load = base_model_class.from_pretrained.__func__
            if (asked := kwargs.pop("variant", None)) is not None:
                return load(cls, pretrained_model_name_or_path, *args, variant=asked, **kwargs)
            folder = Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            if folder.is_dir():
                variant = LOW_RANK_VARIANT if (folder / LOW_RANK_WEIGHTS_NAME).is_file() else None
                return load(cls, pretrained_model_name_or_path, *args, variant=variant, **kwargs)
            try:  # a hub id: the low-rank file, else an older upload's model.safetensors
                return load(cls, pretrained_model_name_or_path, *args, variant=LOW_RANK_VARIANT, **kwargs)
            except OSError:
                return load(cls, pretrained_model_name_or_path, *args, **kwargs)

        def save_pretrained(self, save_directory, *args, **kwargs):
            """``save_pretrained`` (and so ``push_to_hub``) writing ``LOW_RANK_WEIGHTS_NAME``, which the
            plain class does not read: a folder saved again stays a folder it refuses."""
            kwargs.setdefault("variant", LOW_RANK_VARIANT)
            return base_model_class.save_pretrained(self, save_directory, *args, **kwargs)

        model_class = type(f"LowRank{base_model_class.__name__}", (base_model_class,), {
            "config_class": config_class, "__init__": __init__, "__module__": __name__,
            "from_pretrained": classmethod(from_pretrained), "save_pretrained": save_pretrained,
            "__doc__": f"``{base_model_class.__name__}`` with the factorization recorded in its config applied."})
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForSeq2SeqLM.register(config_class, model_class, exist_ok=True)
        _LOW_RANK_CLASSES[base_type] = config_class, model_class
    return _LOW_RANK_CLASSES[base_type]


def register_low_rank(model_type: str) -> None:
    """Make the Auto classes know ``model_type`` (``"pegasus"`` or ``"pegasus_low_rank"``): needed
    before ``AutoModelForSeq2SeqLM.from_pretrained`` reads a factorized folder of a family outside
    ``FAMILIES`` (``load_compressed_model`` does it by itself)."""
    from transformers import CONFIG_MAPPING

    base = model_type.removesuffix(LOW_RANK_SUFFIX)
    if base not in CONFIG_MAPPING:
        raise DecompositionError(f"model_type {model_type!r}: transformers knows no architecture {base!r}; "
                                 f"supported: {SUPPORTED}")
    low_rank_classes(CONFIG_MAPPING[base])


for _family in FAMILIES:
    register_low_rank(_family)
LowRankMarianConfig, LowRankMarianMTModel = low_rank_classes(MarianConfig)


def _saved_config(model: nn.Module):
    """The config to write for ``model``: a factorized model's as its family's low-rank config
    (``low_rank_classes``, so that the Auto classes rebuild the factors), a dense one's unchanged."""
    config = model.config
    if low_rank_ranks(model):
        config_class, model_class = low_rank_classes(type(config))
        if not isinstance(config, config_class):
            config = config_class.from_dict(config.to_dict())
        config.architectures = [model_class.__name__]
    return config


# ---------------------------------------------------------------------------------------------
# Saving and loading


def weights_digest(model: nn.Module, salt: str = "") -> "hashlib._Hash":
    """A sha256 of ``salt``, the model's class and every tensor of its state dict (names and bytes):
    the part of a cache key that says which weights a result was computed from."""
    digest = hashlib.sha256(f"{salt}:{type(model).__name__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest


def save_compressed_model(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> None:
    """Write ``model`` (factorized or not) to the folder ``path``: the weights (tied tensors stored
    once) in ``model.low_rank.safetensors`` (``LOW_RANK_WEIGHTS_NAME``; a dense model's in
    ``model.safetensors``), ``config.json`` with the per-layer ranks (a factorized model as
    ``model_type`` ``<base>_low_rank``, e.g. ``marian_low_rank``, see ``low_rank_classes``), ``generation_config.json``,
    and the tokenizer's files. Load it back with ``load_compressed_model`` or, this module
    imported, ``AutoModelForSeq2SeqLM.from_pretrained``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _record_ranks(model)
    _saved_config(model).save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    # a tied tensor is stored once, under the name it is tied to (as save_pretrained does), which is
    # where from_pretrained looks for it; load_model takes any one name of the tied group
    state = model.state_dict()
    tied = {target for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            if target in state and source in state and state[target].data_ptr() == state[source].data_ptr()}
    name = LOW_RANK_WEIGHTS_NAME if low_rank_ranks(model) else WEIGHTS_NAME
    for stale in {WEIGHTS_NAME, LOW_RANK_WEIGHTS_NAME} - {name}:  # the other one, from an earlier save here
        (path / stale).unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in state.items() if k not in tied}, str(path / name),
              metadata={"format": "pt"})
    chmod_as_umask(path / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def weights_file(folder: str | os.PathLike) -> Path | None:
    """The weights of a folder ``save_compressed_model`` wrote: ``LOW_RANK_WEIGHTS_NAME`` (factorized),
    else ``WEIGHTS_NAME`` (dense, or factorized by an older version); None if neither is there."""
    return next((Path(folder) / name for name in (LOW_RANK_WEIGHTS_NAME, WEIGHTS_NAME)
                 if (Path(folder) / name).is_file()), None)


def load_compressed_model(path: str | os.PathLike, dtype: torch.dtype | None = None, quantize: str | None = None):
    """Rebuild a model saved by ``save_compressed_model``: the base architecture from its config,
    the factorization re-applied at the recorded ranks, then every weight loaded strictly from
    safetensors (a missing or unexpected key is an error). Offline; nothing is unpickled.
    ``quantize="int8"`` returns it with int8 linear layers (``quantize_int8``, CPU)."""
    from transformers import GenerationConfig

    if quantize not in (None, "int8"):
        raise DecompositionError(f"quantize: {quantize!r} is not one of None, 'int8'")
    if quantize == "int8" and dtype not in (None, torch.float32):
        raise DecompositionError(f"quantize='int8' needs float32 weights, got dtype={dtype}; "
                                 f"leave dtype out (or pass torch.float32)")
    path = Path(path)
    weights = weights_file(path)
    if weights is None:
        raise FileNotFoundError(f"{path}: no {LOW_RANK_WEIGHTS_NAME} nor {WEIGHTS_NAME}; is this a folder written by "
                                f"save_compressed_model?")
    if (path / "config.json").is_file():  # a factorized family the Auto classes do not know yet
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type", "")
        if model_type.endswith(LOW_RANK_SUFFIX):
            register_low_rank(model_type)
    config = AutoConfig.from_pretrained(path)
    ranks = (getattr(config, CONFIG_FIELD, None) or {}).get("ranks", {})
    model = AutoModelForSeq2SeqLM.from_config(config, dtype=dtype) if dtype else AutoModelForSeq2SeqLM.from_config(config)
    if not low_rank_ranks(model):  # a low-rank model class is built factorized; older folders say "marian"
        apply_low_rank_structure_(model, ranks)
    _untie_saved_apart_(model, weights)
    missing, unexpected = load_model(model, str(weights), strict=True)
    assert not missing and not unexpected  # strict=True raises first
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return quantize_int8(model) if quantize == "int8" else model.eval()


def load_pretrained(path: str, key: str = "model", tokenizer_kwargs: Mapping[str, str] | None = None):
    """(model, tokenizer) in float32 from a local folder or a hub id: a folder written by this tool
    (factorized) is rebuilt with ``load_compressed_model``, any other encoder-decoder model loads
    with ``AutoModelForSeq2SeqLM`` (and is refused unless ``check_supported``). A path that can only
    be local and is no folder is refused at once with the closest folder ("owner/name" is a hub id
    only when no local folder "owner" exists): a mistyped folder must not turn into minutes of
    network retries. ``key`` (the config key or option) starts each one-line ``DecompositionError``;
    ``tokenizer_kwargs`` go to the tokenizer (a multilingual one's ``src_lang``/``tgt_lang``).
    Never runs remote code."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    local = Path(path)
    if not local.is_dir() and (path.startswith((".", "/", "~")) or local.suffix or path.count("/") > 1
                               or Path(path.split("/")[0]).is_dir()):
        siblings = [str(p) for p in local.parent.iterdir() if p.is_dir()] if local.parent.is_dir() else []
        close = difflib.get_close_matches(str(local), siblings, n=1, cutoff=0.6)
        hint = f"; closest: {close[0]!r}" if close else ""
        looked = "" if os.path.isabs(path) else \
            f" (relative to the current folder: looked for {os.path.abspath(path)!r})"
        raise DecompositionError(f"{key}: {path!r} is not a folder{looked}{hint}; nor a hub id like "
                                 f"'Helsinki-NLP/opus-mt-en-de'")
    try:
        model_config = AutoConfig.from_pretrained(path)
        if not model_config.is_encoder_decoder:
            raise DecompositionError(f"{key}: {path!r} is a {model_config.model_type} model, not an "
                                     f"encoder-decoder; supported: {SUPPORTED}")
        if getattr(model_config, CONFIG_FIELD, None):
            model = load_compressed_model(path, dtype=torch.float32)
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, **(tokenizer_kwargs or {}))
    except DecompositionError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if type(e).__name__ == "SafetensorError":  # a weights file cut short: name it, not only the folder
            broken = _unreadable_weights(path)
            if broken is not None:
                raise DecompositionError(
                    f"{key}: {str(broken)!r} ({broken.stat().st_size} bytes) looks truncated or incomplete "
                    f"({first.removeprefix('Error while deserializing header: ')}): download it again, or save "
                    f"the model again") from None
        where = "" if local.is_dir() else f" (no folder {os.path.abspath(path)!r} relative to the current folder, " \
                                           f"so as a hub id)"
        raise DecompositionError(f"{key}: cannot load {path!r}{where}: {first}") from None
    check_supported(model)
    return model.eval(), tokenizer


def _unreadable_weights(path: str) -> Path | None:
    """The first ``*.safetensors`` file of the model ``path`` (a folder, or a hub id's cached snapshot)
    whose header safetensors cannot read, or None."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():  # a hub id: the snapshot it was read from, if cached
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, WEIGHTS_NAME)
        folder = Path(cached).parent if isinstance(cached, str) else None
    for file in sorted(folder.glob("*.safetensors")) if folder is not None else []:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception:  # noqa: BLE001 - SafetensorError, or the file cannot be read at all
            return file
    return None


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` (the factors of ``LowRankLinear`` included)
    replaced by PyTorch's dynamically quantized int8 linear: int8 weights, activations quantized
    on the fly, CPU only. Embeddings stay float32, and so does the B factor of a
    ``LowRankEmbedding``, which is used as a matrix rather than called as a layer."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    skip = {id(m.down) for m in model.modules() if isinstance(m, LowRankEmbedding)}
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and id(m) not in skip]
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in torch 2.10+, still present
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        return quantize_dynamic(model, {name: default_dynamic_qconfig for name in names}, dtype=torch.qint8).eval()


def size_mb(model: nn.Module) -> float:
    """Megabytes of the model's weights and buffers as held in memory (tied tensors once; int8
    weights of quantized layers at one byte each)."""
    seen, total = set(), 0

    def add(value) -> None:
        nonlocal total
        if isinstance(value, (tuple, list)):
            for v in value:
                add(v)
        elif isinstance(value, torch.Tensor) and (value.data_ptr(), value.dtype) not in seen:
            seen.add((value.data_ptr(), value.dtype))
            total += value.numel() * value.element_size()

    for value in model.state_dict().values():
        add(value)
    return round(total / 2**20, 3)


def describe_ranks(ranks: Mapping[str, int]) -> str:
    """Compact summary of the ranks: "48 layers, rank 32" or "48 layers, ranks 16–64"."""
    values = sorted(set(ranks.values()))
    if not values:
        return "no layers"
    span = f"rank {values[0]}" if len(values) == 1 else f"ranks {values[0]}–{values[-1]}"
    return f"{len(ranks)} layers, {span}"


