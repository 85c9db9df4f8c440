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

Two ways to write them into the graph, chosen by ``fused`` (a context manager the exporter enters):

- plain (outside ``fused``): the standard ONNX operators (Reshape, Transpose, Concat, MatMul,
  Softmax), which any ONNX runtime runs;
- fused: one ``com.microsoft.MultiHeadAttention`` node per attention, ONNX Runtime's own operator
  (its CPU kernel does the head split, the cache append, the scores, softmax and the weighted sum
  in one call). The graph then needs the opset ``FUSED_OPSETS`` and ONNX Runtime to run. While
  tracing, the node's outputs are computed by the plain PyTorch code, so the traced values are the
  same either way. ``onnx_export`` writes fused graphs unless told otherwise: at opus-mt-en-de's
  shape (int8, 1 thread, ``benchmarks/bench_attention.py``, alone on the machine) the dense model's
  were 1.07× the plain ones at batch 32, the half-size student's 0.98× (within the spread;
  BENCHMARKS.md "Fused attention"). The attention costs about
  as much as before either way: the node, too, copies the cache into the grown one at every step.

A call the fused operator cannot express (a bias that is not 4-D) is written plain even inside
``fused``, which then lists why (``unfused``), for the exporter to refuse or report.
"""

from __future__ import annotations

import contextlib
import functools

FUSED_DOMAIN = "com.microsoft"
FUSED_OPSETS = {FUSED_DOMAIN: 1}  # torch.onnx.export(..., custom_opsets=FUSED_OPSETS) for a fused graph

_fused = False
_unfused: list[str] = []


@contextlib.contextmanager
def fused(on: bool = True):
    """Within: ``attention`` and ``cached_attention`` trace to ``com.microsoft.MultiHeadAttention``
    nodes (``on``). Yields a list that gathers, for each call written plain all the same, why."""
    global _fused, _unfused
    before, _fused = (_fused, _unfused), on
    _unfused = []
    try:
        yield _unfused
    finally:
        _fused, _unfused = before


def split_heads(x, num_heads: int, head_dim: int, step: bool):
    """(B, T, H·Dh) → (B, H, T, Dh). In a decoding step T = 1: a constant shape, so the graph
    computes no shapes at every step."""
    shape = (-1, 1) if step else (x.shape[0], -1)
    return x.reshape(*shape, num_heads, head_dim).transpose(1, 2)


def merge_heads(x, width: int, step: bool):
    """(B, H, T, Dh) → (B, T, H·Dh = width)."""
    x = x.transpose(1, 2)
    return x.reshape(-1, 1, width) if step else x.reshape(x.shape[0], -1, width)


def _plain_attention(query, keys, values, bias, num_heads: int, head_dim: int, scale: float, step: bool):
    import torch

    q = split_heads(query, num_heads, head_dim, step)
    scores = torch.matmul(q, keys.transpose(2, 3))
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    return merge_heads(torch.matmul(torch.softmax(scores, dim=-1), values), num_heads * head_dim, step)


def _plain_cached_attention(query, key, value, past_key, past_value, num_heads: int, head_dim: int, scale: float,
                            bias):
    import torch

    keys = torch.cat([past_key, split_heads(key, num_heads, head_dim, True)], dim=2)
    values = torch.cat([past_value, split_heads(value, num_heads, head_dim, True)], dim=2)
    return _plain_attention(query, keys, values, bias, num_heads, head_dim, scale, True), keys, values


@functools.cache
def _multi_head_attention():
    """The autograd Function whose trace is one ``com.microsoft.MultiHeadAttention`` node (made on
    first use: the module imports no torch until then).

    apply(query (B, T, D), key, value, bias, past_key, past_value, num_heads, head_dim, scale):
    without a past, key and value are (B, H, S, Dh) (the operator's "BNSH" layout) → output
    (B, T, D); with one, key and value are the step's (B, 1, D) and past_key, past_value
    (B, H, P, Dh) → (output, present_key, present_value (B, H, P+1, Dh)). bias (1 or B, 1 or H, T,
    S or P+1) or None goes to the operator's ``attention_bias`` input."""
    import torch

    class MultiHeadAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, bias, past_key, past_value, num_heads, head_dim, scale):
            if past_key is None:
                return _plain_attention(query, key, value, bias, num_heads, head_dim, scale, False)
            return _plain_cached_attention(query, key, value, past_key, past_value, num_heads, head_dim, scale, bias)

        @staticmethod
        def symbolic(g, query, key, value, bias, past_key, past_value, num_heads, head_dim, scale):
            def absent():  # an optional input left out: an empty name in the node's input list
                node = g.op("prim::Constant")
                node.setType(torch._C.OptionalType.ofTensor())
                return node

            inputs = [query, key, value, absent(), absent(), absent() if bias is None else bias]
            if past_key is not None:
                inputs += [past_key, past_value]
            outputs = g.op(f"{FUSED_DOMAIN}::MultiHeadAttention", *inputs, num_heads_i=num_heads, scale_f=scale,
                           outputs=1 if past_key is None else 3)
            if past_key is None:
                outputs.setType(query.type())
                return outputs
            output, present_key, present_value = outputs
            output.setType(query.type())
            present_key.setType(past_key.type())
            present_value.setType(past_value.type())
            return output, present_key, present_value

    return MultiHeadAttention


def _fusable(bias) -> bool:
    if not _fused:
        return False
    if bias is not None and bias.dim() != 4:
        _unfused.append(f"a bias of shape {tuple(bias.shape)} (it takes 4-D ones)")
        return False
    return True


def attention(query, keys, values, bias, num_heads: int, head_dim: int, scale: float, step: bool):
    """query (B, T, H·Dh), projected; keys, values (B, H, S, Dh) → (B, T, H·Dh), before the output
    projection. Sizes are given as numbers, not read off the tensors, so the graph holds them as constants."""
    if not _fusable(bias):
        return _plain_attention(query, keys, values, bias, num_heads, head_dim, scale, step)
    if bias is not None and not step:  # the operator wants the bias's query axis whole: (…, 1, S) → (…, T, S)
        bias = bias.expand(-1, -1, query.shape[1], -1)
    return _multi_head_attention().apply(query, keys, values, bias, None, None, num_heads, head_dim, float(scale))


def cached_attention(query, key, value, past_key, past_value, num_heads: int, head_dim: int, scale: float,
                     bias=None):
    """One decoding step's self-attention: query, key, value (B, 1, D), projected; past_key,
    past_value (B, H, P, Dh) → (output (B, 1, D), present_key, present_value (B, H, P+1, Dh))."""
    if not _fusable(bias):
        return _plain_cached_attention(query, key, value, past_key, past_value, num_heads, head_dim, scale, bias)
    return _multi_head_attention().apply(query, key, value, bias, past_key, past_value, num_heads, head_dim,
                                         float(scale))
