"""The token tables of the exported step functions, shared by every family (``onnx_bart``,
``onnx_t5``): the lookup of a (possibly factorized) embedding and the output projection, which
multiplies by the same tensor when it is tied to the embedding, so the graph holds it once."""

from __future__ import annotations


def table(embedding):
    """The tensor a token lookup gathers columns from: Eᵀ (d, V), or Aᵀ (r, V) of E ≈ A·B."""
    from matrix_decomposition import LowRankEmbedding

    weight = embedding.up.weight if isinstance(embedding, LowRankEmbedding) else embedding.weight
    return weight.t()


def rows(embedding, tab, ids):
    """ids (B, T) → their unscaled embedding rows (B·T, d): gathered from ``tab``, times the second
    factor where the embedding is factorized."""
    from matrix_decomposition import LowRankEmbedding

    gathered = tab.index_select(1, ids.reshape(-1)).t()  # (B·T, d or r)
    return gathered @ embedding.down.weight if isinstance(embedding, LowRankEmbedding) else gathered


def is_tied(head, embedding) -> bool:
    """Whether the output projection ``head`` multiplies by ``embedding``'s own table (dense or factorized)."""
    from torch import nn

    from matrix_decomposition import LowRankEmbedding, LowRankLinear

    if isinstance(head, nn.Linear):
        return head.weight is embedding.weight
    return (isinstance(head, LowRankLinear) and isinstance(embedding, LowRankEmbedding)
            and head.up.weight is embedding.up.weight)


def project(h, head, tab, tied: bool):
    """The logits (B, V) of the last hidden states ``h`` (B, d): through the tied table ``tab``, or
    the untied ``head`` itself."""
    from matrix_decomposition import LowRankLinear

    if not tied:
        return head(h)
    if isinstance(head, LowRankLinear):
        return (h @ head.down.weight.t()) @ tab  # (B, d) @ (d, r) @ (r, V)
    return h @ tab  # (B, d) @ (d, V)
