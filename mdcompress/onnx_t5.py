"""The step functions of T5 and mT5 (MADLAD-400 is T5) for ``onnx_export``, with the interface of
``onnx_bart``: ``check(model)``, ``describe(model)`` and ``graphs(model)`` → (the encoder: (input_ids,
attention_mask) → the cross-attention keys and values of every decoder layer; the decoder step:
(input_ids (B, 1), attention_mask, the self-attention cache of each layer, the cross-attention keys
and values) → (the next token's logits (B, V), the cache grown by one)).

What T5 does differently from Marian, restated here around the model's own modules (the factorized
layers export as their two small matrix products):

- layer norm before each sublayer (``T5LayerNorm``: a scale, no mean, no bias), residual after it,
  and a final layer norm at the end of the encoder and of the decoder;
- no position embeddings: a learned bias per head and relative-position bucket is added to the
  self-attention scores. The first layer of each stack holds the table, the others use the same
  bias. The encoder's buckets are bidirectional; the decoder's are causal, for the step's one query
  (position P, the length of the cache) over the keys 0..P. The cross-attention has no position bias;
  ``onnx_attention`` gets the position bias plus the padding bias as ``bias``;
- the scores are not scaled (scale 1: the query projection carries it) and the embedding is not
  scaled either;
- the feed-forward is ``wo(act(wi(x)))``, or gated (``feed_forward_proj`` "gated-gelu": mT5, T5 v1.1,
  MADLAD-400) ``wo(act(wi_0(x)) · wi_1(x))``;
- the output projection: T5 (not mT5) multiplies the decoder's output by d_model^-0.5 first, when
  its config says so (``scale_decoder_outputs``, set from ``tie_word_embeddings``); no final_logits_bias.

Buckets: a relative distance maps to a bucket by a logarithm (``T5Attention._relative_position_bucket``),
and every distance from ``max(relative_attention_max_distance, relative_attention_num_buckets)`` on
has the last bucket. The graphs hold the bucket of each distance up to that bound as a table computed
by that very function at export, and clip longer distances to it: the same buckets as PyTorch's,
with no floating-point logarithm of ONNX Runtime to round differently at a bucket's edge.
"""

from __future__ import annotations

from mdcompress.errors import ExportError
from mdcompress.onnx_attention import attention, cached_attention, split_heads
from mdcompress.onnx_embedding import is_tied, project, rows, table


def check(model) -> None:
    """Refuse, in one line, a model whose layout these step functions do not restate."""
    from transformers import MT5ForConditionalGeneration, T5ForConditionalGeneration

    name = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r})"
    if not isinstance(model, (T5ForConditionalGeneration, MT5ForConditionalGeneration)):
        raise ExportError(f"{name} cannot be exported: supported are T5ForConditionalGeneration and "
                          f"MT5ForConditionalGeneration, compressed by this tool or not")
    for stack in (model.encoder, model.decoder):
        held = [i for i, block in enumerate(stack.block) if block.layer[0].SelfAttention.has_relative_attention_bias]
        if held != [0]:  # umT5 has a table in every layer (a model_type of its own)
            raise ExportError(f"{name} cannot be exported: its relative position bias is held by the layers {held} "
                              f"of the {'decoder' if stack.is_decoder else 'encoder'}; the exporter restates T5's, "
                              f"held by the first layer alone")


def describe(model) -> dict:
    """What onnx_export.json says of the graphs: layers, heads, head_dim, vocab_size; max_positions is
    None (relative positions: no limit to the length of a source or a translation)."""
    module = model.decoder.block[0].layer[0].SelfAttention
    return {"layers": len(model.decoder.block), "heads": module.n_heads, "head_dim": module.key_value_proj_dim,
            "max_positions": None, "vocab_size": int(model.lm_head.out_features)}


def scales_output(model) -> bool:
    """Whether the model multiplies the decoder's output by d_model^-0.5 before the output projection:
    T5 does when its config says so (``scale_decoder_outputs``, from ``tie_word_embeddings``); mT5 never."""
    from transformers import T5ForConditionalGeneration

    config = model.config
    return isinstance(model, T5ForConditionalGeneration) and bool(
        getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))


def bucket_table(module, bidirectional: bool):
    """The relative-position bucket of every distance up to the bound past which all have the last
    one, by ``module``'s own bucketing: bidirectional, indexed by key − query + bound (0..2·bound);
    causal, indexed by query − key (0..bound). Returns (table (int64), bound)."""
    import torch

    bound = max(module.relative_attention_max_distance, module.relative_attention_num_buckets)
    relative = torch.arange(-bound, bound + 1) if bidirectional else -torch.arange(bound + 1)  # key − query
    table = module._relative_position_bucket(relative, bidirectional=bidirectional,
                                             num_buckets=module.relative_attention_num_buckets,
                                             max_distance=module.relative_attention_max_distance)
    return table.to(torch.long), bound


def graphs(model):
    """(encoder module, decoder-step module) for ``model``, a T5 or mT5 model (factorized or not)."""
    import torch
    from torch import nn

    from matrix_decomposition import LowRankEmbedding

    encoder, decoder = model.encoder, model.decoder
    neg = torch.finfo(torch.float32).min
    encoder_relative = encoder.block[0].layer[0].SelfAttention
    decoder_relative = decoder.block[0].layer[0].SelfAttention

    def lookup(embedding, tab, ids, step: bool = False):  # ids (B, T) → (B, T, d)
        found = rows(embedding, tab, ids)
        if isinstance(embedding, LowRankEmbedding) and embedding.embed_scale is not None:  # none in T5; kept
            found = found * embedding.embed_scale  # should a factorized T5 ever carry one
        return found.reshape(-1, 1, embedding.embedding_dim) if step else found.reshape(ids.shape[0], ids.shape[1], -1)

    def heads(x, module, step: bool):  # (B, T, D) → (B, H, T, Dh)
        return split_heads(x, module.n_heads, module.key_value_proj_dim, step)

    def attend(module, query, keys, values, bias, step: bool):  # query (B, T, d) normed; keys, values (B, H, S, Dh)
        out = attention(module.q(query), keys, values, bias, module.n_heads, module.key_value_proj_dim, 1.0, step)
        return module.o(out)

    def feed_forward(layer, x):  # the block's last sublayer: x + wo(act(wi(ln(x)))), or gated
        dense = layer.DenseReluDense
        h = layer.layer_norm(x)
        h = dense.act(dense.wi_0(h)) * dense.wi_1(h) if hasattr(dense, "wi_0") else dense.act(dense.wi(h))
        return x + dense.wo(h)

    def padding_bias(attention_mask):  # (B, S) → (B, 1, 1, S): 0 where real, the float minimum where padded
        return (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * neg

    encoder_buckets, encoder_bound = bucket_table(encoder_relative, bidirectional=True)
    decoder_buckets, decoder_bound = bucket_table(decoder_relative, bidirectional=False)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = encoder, decoder
            self.register_buffer("buckets", encoder_buckets, persistent=False)

        def forward(self, input_ids, attention_mask):
            x = lookup(encoder.embed_tokens, table(encoder.embed_tokens), input_ids)  # (B, S, d)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            relative = (positions[None, :] - positions[:, None]).clamp(-encoder_bound, encoder_bound)  # key − query
            position_bias = encoder_relative.relative_attention_bias(self.buckets[relative + encoder_bound])
            bias = position_bias.permute(2, 0, 1)[None] + padding_bias(attention_mask)  # (S, S, H) → (B, H, S, S)
            for block in encoder.block:
                module, norm = block.layer[0].SelfAttention, block.layer[0].layer_norm
                h = norm(x)
                keys, values = heads(module.k(h), module, False), heads(module.v(h), module, False)
                x = x + attend(module, h, keys, values, bias, False)
                x = feed_forward(block.layer[-1], x)
            x = encoder.final_layer_norm(x)
            cross = []
            for block in decoder.block:
                module = block.layer[1].EncDecAttention
                cross += [heads(module.k(x), module, False), heads(module.v(x), module, False)]
            return tuple(cross)

    head = model.lm_head
    embedding = decoder.embed_tokens
    tied = is_tied(head, embedding)
    output_scale = model.config.d_model ** -0.5 if scales_output(model) else None

    class DecoderStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.head = decoder, head
            self.register_buffer("buckets", decoder_buckets, persistent=False)

        def forward(self, input_ids, attention_mask, *cache):  # cache: self k, v per layer, then cross k, v per layer
            n = len(decoder.block)
            past, cross = cache[: 2 * n], cache[2 * n:]
            tab = table(embedding)
            x = lookup(embedding, tab, input_ids, step=True)  # (B, 1, d)
            step = past[0].shape[2]  # positions already in the cache: this token's position
            positions = torch.arange(step + 1, device=input_ids.device)  # of the keys
            distance = (step - positions).clamp(max=decoder_bound)  # query − key
            position_bias = decoder_relative.relative_attention_bias(self.buckets[distance])  # (P+1, H)
            self_bias = position_bias.t()[None, :, None, :]  # (1, H, 1, P+1)
            cross_bias = padding_bias(attention_mask)
            present = []
            for i, block in enumerate(decoder.block):
                module = block.layer[0].SelfAttention
                h = block.layer[0].layer_norm(x)
                out, keys, values = cached_attention(module.q(h), module.k(h), module.v(h), past[2 * i],
                                                     past[2 * i + 1], module.n_heads, module.key_value_proj_dim,
                                                     1.0, self_bias)
                present += [keys, values]
                x = x + module.o(out)
                x = x + attend(block.layer[1].EncDecAttention, block.layer[1].layer_norm(x), cross[2 * i],
                               cross[2 * i + 1], cross_bias, True)
                x = feed_forward(block.layer[-1], x)
            h = decoder.final_layer_norm(x)[:, 0]  # (B, d)
            if output_scale is not None:
                h = h * output_scale
            return (project(h, head, tab, tied), *present)

    return Encoder().eval(), DecoderStep().eval()
