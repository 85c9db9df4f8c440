"""Distillation losses: pure functions of activations (never of weights).

Shapes: B batch, T target length, S source length, V vocabulary, H hidden size, A heads.
Masks are boolean, True at real (non-padded) positions. Every loss averages over real positions
only and returns 0, never NaN, when there are none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

IGNORE_INDEX = -100
TINY_LOG = -27.631  # log(1e-12): the floor of a log-probability that may be log(0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, T) over positions where ``mask`` (B, T) is True; 0 if there are none."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _softmax(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(z), logsumexp(z)) over the last dimension from one pass of exp (a new tensor)."""
    top = z.amax(dim=-1, keepdim=True)
    p = (z - top).exp_()
    total = p.sum(dim=-1, keepdim=True)
    return p.div_(total), (total.log_() + top).squeeze(-1)


def output_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             mask: torch.Tensor | None, temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher ‖ student) between temperature-softened distributions over the vocabulary,
    scaled by T² (so its gradients keep their size as T changes; Hinton et al. 2015),
    averaged over real target tokens."""
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    weights = mask.float() / mask.sum().clamp(min=1)  # (B, T): each real token's share of the mean
    return _SoftenedKL.apply(student_logits, teacher_logits.detach(), weights, float(temperature))


class _SoftenedKL(torch.autograd.Function):
    """T²·Σ weights·KL(p_t ‖ p_s) with its gradient in closed form, T·(p_s − p_t)·weights: the same
    values as autograd through log_softmax, at a fraction of the cost over a large vocabulary."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, weights, t):  # (B, T, V), (B, T, V), (B, T), float
        z_s, z_t = student_logits.float() / t, teacher_logits.float() / t  # (B, T, V)
        p_s, log_norm_s = _softmax(z_s)  # one pass of exp each
        p_t, log_norm_t = _softmax(z_t)
        # Σ p_t·(log p_t − log p_s) with log p = z − logsumexp(z) and Σ p_t = 1
        kl = (p_t * (z_t - z_s)).sum(dim=-1) - log_norm_t + log_norm_s  # (B, T)
        ctx.save_for_backward(p_s, p_t, weights)
        ctx.t, ctx.dtype = t, student_logits.dtype
        return (kl * weights).sum() * t * t

    @staticmethod
    def backward(ctx, grad_output):
        p_s, p_t, weights = ctx.saved_tensors
        scale = (weights * (ctx.t * grad_output)).unsqueeze(-1)  # (B, T, 1)
        return (p_s.sub_(p_t).mul_(scale)).to(ctx.dtype), None, None, None  # in place: p_s is not needed again


def top_k_distillation_loss(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logits: torch.Tensor,
                            teacher_log_norm: torch.Tensor, mask: torch.Tensor | None,
                            temperature: float = 2.0) -> torch.Tensor:
    """``output_distillation_loss`` against a teacher known by its k largest logits per position
    (``top_ids``, ``top_logits``: (B, T, k)) and the log-normalizer of its softened distribution,
    logsumexp(logits / T) over the whole vocabulary (``teacher_log_norm``: (B, T)). The KL is taken
    over k + 1 outcomes: each of the k tokens, and "any other token", whose probability is what the
    k leave over, in both models. With k = V it is the full KL; with fewer it is exact on the
    teacher's k tokens and matches the rest as one lump (so the student is neither taught that the
    tail is empty nor left free to grow it)."""
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    weights = mask.float() / mask.sum().clamp(min=1)  # (B, T): each real token's share of the mean
    return _TopKSoftenedKL.apply(student_logits, top_ids, top_logits.detach(), teacher_log_norm.detach(), weights,
                                 float(temperature))


class _TopKSoftenedKL(torch.autograd.Function):
    """T²·Σ weights·KL over (the k tokens, the rest) with its gradient in closed form: with q the
    student's softened distribution, p the teacher's on its k tokens (scattered, 0 elsewhere), p_r and
    q_r the two models' mass on the rest, d/d(logits) = T·weights·(q − p − (p_r / q_r)·q·[not in k])."""

    @staticmethod
    def forward(ctx, student_logits, top_ids, top_logits, log_norm, weights, t):  # (B,T,V) (B,T,k) (B,T,k) (B,T)
        z = student_logits.float() / t  # (B, T, V)
        q_all, log_norm_q = _softmax(z)  # one pass of exp
        log_q = z.gather(-1, top_ids) - log_norm_q.unsqueeze(-1)  # (B, T, k)
        q_rest = (1.0 - log_q.exp().sum(dim=-1)).clamp(min=1e-12)  # (B, T)
        log_p = top_logits.float() / t - log_norm.float().unsqueeze(-1)  # (B, T, k)
        p = log_p.exp()
        p_rest = (1.0 - p.sum(dim=-1)).clamp(min=0.0)  # (B, T)
        kl = (p * (log_p - log_q)).sum(dim=-1) + p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log())  # (B, T)
        ctx.save_for_backward(q_all, top_ids, p, p_rest, q_rest, weights)
        ctx.t, ctx.dtype = t, student_logits.dtype
        return (kl * weights).sum() * t * t

    @staticmethod
    def backward(ctx, grad_output):
        q, top_ids, p, p_rest, q_rest, weights = ctx.saved_tensors  # q: (B, T, V), changed in place below
        scale = (weights * (ctx.t * grad_output)).unsqueeze(-1)  # (B, T, 1)
        q_top = q.gather(-1, top_ids)  # (B, T, k)
        grad = q.mul_(scale * (1.0 - p_rest / q_rest).unsqueeze(-1))  # outside the k: q·(1 − p_r/q_r)
        grad.scatter_(-1, top_ids, (q_top - p) * scale)  # on the k: q − p
        return grad.to(ctx.dtype), None, None, None, None, None


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-level cross-entropy against the references; labels (B, T) of -100 are ignored."""
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keeps the graph, no NaN
    return _CrossEntropy.apply(logits, labels, float(label_smoothing))


class _CrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=ε)`` (the mean
    over real tokens of (1 − ε)·(−log p_y) + ε·mean_v(−log p_v)) with its gradient in closed form,
    (p − (1 − ε)·onehot(y) − ε/V) / tokens: one pass of exp over the vocabulary instead of the two of
    log_softmax and its backward, the largest cost of a plain step after the output projection."""

    @staticmethod
    def forward(ctx, logits, labels, smoothing):  # (B, T, V) or (N, V), labels laid out like logits[..., 0]
        flat = logits.float().reshape(-1, logits.shape[-1])  # (N, V)
        flat_labels = labels.reshape(-1)
        real = flat_labels != IGNORE_INDEX  # (N,)
        targets = flat_labels.clamp(min=0)
        p, log_norm = _softmax(flat)  # (N, V), (N,)
        nll = log_norm - flat.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # −log p_y
        if smoothing:
            nll = (1.0 - smoothing) * nll + smoothing * (log_norm - flat.mean(dim=-1))  # mean_v(−log p_v)
        weights = real.float() / real.sum()  # each real token's share of the mean
        ctx.save_for_backward(p, targets, weights)
        ctx.smoothing, ctx.shape, ctx.dtype = smoothing, logits.shape, logits.dtype
        return (nll * weights).sum()

    @staticmethod
    def backward(ctx, grad_output):
        p, targets, weights = ctx.saved_tensors
        grad = p.sub_(ctx.smoothing / p.shape[-1]) if ctx.smoothing else p  # in place: p is not needed again
        grad.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(weights, ctx.smoothing - 1.0).unsqueeze(-1))
        grad.mul_((weights * grad_output).unsqueeze(-1))  # ignored positions get 0
        return grad.reshape(ctx.shape).to(ctx.dtype), None, None


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between two activations (B, L, H) at real positions, averaged over H."""
    squared = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (B, L)
    return masked_mean(squared, mask)


def mean_feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``feature_loss`` averaged over matched pairs of activations (layer outputs, hidden states)."""
    losses = [feature_loss(s, t, m) for s, t, m in zip(student, teacher, masks, strict=True)]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def attention_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                   query_masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """MSE between attention probabilities (B, A, Lq, Lk), per layer, at real query positions,
    averaged over layers (as in TinyBERT). Padded keys carry probability 0 in both models."""
    losses = []
    for s, t, mask in zip(student, teacher, query_masks, strict=True):
        squared = (s.float() - t.float()).pow(2).sum(dim=-1).mean(dim=1)  # (B, Lq)
        losses.append(masked_mean(squared, mask))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Σ weight·term over the terms with a non-zero weight."""
    return sum(weights[name] * value for name, value in terms.items() if weights.get(name, 0.0))
