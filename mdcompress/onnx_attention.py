"""The attention of the exported step functions, in one place.

Every family's step functions (``onnx_bart``, ``onnx_t5``) call these three functions for all
their attention, so the graph that ``torch.onnx`` traces from them can be changed here alone:

- ``split_heads``: (B, T, D) → (B, H, T, Dh).
- ``attention``: queries over keys and values already split into heads (the encoder's
  self-attention, the decoder's cross-attention over the encoder's keys and values).
- ``cached_attention``: one decoding step's self-attention, which appends the step's key and value
  to the cache and returns the grown cache.

``bias`` is added to the scores before the softmax: padding (B, 1, 1, S) as 0 / the float minimum,
and for T5 its relative position bias (1 or B, H, T, S); ``scale`` multiplies the scores (1/√Dh,
or 1 for T5, whose query projection carries it).
"""

from __future__ import annotations


def split_heads(x, num_heads: int, head_dim: int, step: bool):
    """(B, T, H·Dh) → (B, H, T, Dh). In a decoding step T = 1: a constant shape, so the graph
    computes no shapes at every step."""
    shape = (-1, 1) if step else (x.shape[0], -1)
    return x.reshape(*shape, num_heads, head_dim).transpose(1, 2)


def merge_heads(x, width: int, step: bool):
    """(B, H, T, Dh) → (B, T, H·Dh = width)."""
    x = x.transpose(1, 2)
    return x.reshape(-1, 1, width) if step else x.reshape(x.shape[0], -1, width)


def attention(query, keys, values, bias, num_heads: int, head_dim: int, scale: float, step: bool):
    """query (B, T, H·Dh), projected; keys, values (B, H, S, Dh) → (B, T, H·Dh), before the output
    projection. Sizes are given as numbers, not read off the tensors, so the graph holds them as constants."""
    import torch

    q = split_heads(query, num_heads, head_dim, step)
    scores = torch.matmul(q, keys.transpose(2, 3))
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    return merge_heads(torch.matmul(torch.softmax(scores, dim=-1), values), num_heads * head_dim, step)


def cached_attention(query, key, value, past_key, past_value, num_heads: int, head_dim: int, scale: float,
                     bias=None):
    """One decoding step's self-attention: query, key, value (B, 1, D), projected; past_key,
    past_value (B, H, P, Dh) → (output (B, 1, D), present_key, present_value (B, H, P+1, Dh))."""
    import torch

    keys = torch.cat([past_key, split_heads(key, num_heads, head_dim, True)], dim=2)
    values = torch.cat([past_value, split_heads(value, num_heads, head_dim, True)], dim=2)
    return attention(query, keys, values, bias, num_heads, head_dim, scale, True), keys, values
