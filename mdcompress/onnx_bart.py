"""The step functions of the BART-like families for ``onnx_export``: MarianMT (today), and the
families whose layers have the same shape (M2M100/NLLB, mBART, BART: still refused by ``check``).

``graphs(model)`` returns the two modules that ``torch.onnx`` traces (see ``onnx_export``):

- the encoder: (input_ids, attention_mask) → the cross-attention keys and values of every decoder
  layer, computed once per sentence;
- the decoder step: (input_ids (B, 1), attention_mask, the self-attention cache of each layer, the
  cross-attention keys and values) → (the next token's logits (B, V), the cache grown by one).

They restate the model's forward pass around its own modules (the factorized layers export as
their two small matrix products); all attention goes through ``onnx_attention``.
"""

from __future__ import annotations

from mdcompress.errors import ExportError
from mdcompress.onnx_attention import attention, cached_attention, split_heads


def check(model) -> None:
    """Refuse, in one line, a model whose layout these step functions do not restate."""
    from transformers import MarianMTModel

    if not isinstance(model, MarianMTModel):
        raise ExportError(f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}) cannot "
                          f"be exported yet: supported is MarianMT, compressed by this tool or not")
    if getattr(model.config, "normalize_before", False) or getattr(model.model.encoder, "layer_norm", None) is not None:
        raise ExportError("pre-norm Marian variants (normalize_before) cannot be exported yet")


def describe(model) -> dict:
    """What onnx_export.json says of the graphs: layers, heads, head_dim, max_positions, vocab_size."""
    attention_module = model.model.decoder.layers[0].self_attn
    return {"layers": len(model.model.decoder.layers), "heads": attention_module.num_heads,
            "head_dim": attention_module.head_dim,
            "max_positions": int(model.model.decoder.embed_positions.weight.shape[0]),
            "vocab_size": int(model.final_logits_bias.shape[-1])}


def graphs(model):
    """(encoder module, decoder-step module) for ``model``, a MarianMTModel (factorized or not)."""
    import torch
    from torch import nn

    from matrix_decomposition import LowRankEmbedding, LowRankLinear

    encoder, decoder = model.model.encoder, model.model.decoder
    neg = torch.finfo(torch.float32).min

    def table(embedding):
        """The tensor a token lookup gathers columns from: Eᵀ (d, V), or Aᵀ (r, V) of E ≈ A·B. An
        output projection tied to the embedding multiplies by the same tensor, so the graph holds it once."""
        weight = embedding.up.weight if isinstance(embedding, LowRankEmbedding) else embedding.weight
        return weight.t()

    def lookup(embedding, tab, ids, step: bool = False):  # ids (B, T) → (B, T, d)
        rows = tab.index_select(1, ids.reshape(-1)).t()  # (B·T, d or r)
        if isinstance(embedding, LowRankEmbedding):
            rows = rows @ embedding.down.weight  # (B·T, r) @ (r, d)
            if embedding.embed_scale is not None:  # a scaled word embedding's own factor (1 or absent in Marian)
                rows = rows * embedding.embed_scale
        return rows.reshape(-1, 1, embedding.embedding_dim) if step else rows.reshape(ids.shape[0], ids.shape[1], -1)

    def heads(x, module, step: bool):  # (B, T, D) → (B, H, T, Dh)
        return split_heads(x, module.num_heads, module.head_dim, step)

    def attend(module, query, keys, values, bias, step: bool):  # query (B, T, D); keys, values (B, H, S, Dh)
        out = attention(module.q_proj(query), keys, values, bias, module.num_heads, module.head_dim, module.scaling,
                        step)
        return module.out_proj(out)

    def feed_forward(layer, x):
        return layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))

    def padding_bias(attention_mask):  # (B, S) → (B, 1, 1, S): 0 where real, the float minimum where padded
        return (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * neg

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = encoder, decoder

        def forward(self, input_ids, attention_mask):
            x = lookup(encoder.embed_tokens, table(encoder.embed_tokens), input_ids) * encoder.embed_scale
            x = x + encoder.embed_positions.weight[: input_ids.shape[1]]
            bias = padding_bias(attention_mask)
            for layer in encoder.layers:
                module = layer.self_attn
                keys, values = heads(module.k_proj(x), module, False), heads(module.v_proj(x), module, False)
                x = layer.self_attn_layer_norm(x + attend(module, x, keys, values, bias, False))
                x = feed_forward(layer, x)
            cross = []
            for layer in decoder.layers:
                module = layer.encoder_attn
                cross += [heads(module.k_proj(x), module, False), heads(module.v_proj(x), module, False)]
            return tuple(cross)

    head = model.lm_head
    tied = head.weight is decoder.embed_tokens.weight if isinstance(head, nn.Linear) else (
        isinstance(head, LowRankLinear) and isinstance(decoder.embed_tokens, LowRankEmbedding)
        and head.up.weight is decoder.embed_tokens.up.weight)

    class DecoderStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.head = decoder, head
            self.register_buffer("final_logits_bias", model.final_logits_bias.detach().clone(), persistent=False)

        def forward(self, input_ids, attention_mask, *cache):  # cache: self k, v per layer, then cross k, v per layer
            n = len(decoder.layers)
            past, cross = cache[: 2 * n], cache[2 * n:]
            tab = table(decoder.embed_tokens)
            x = lookup(decoder.embed_tokens, tab, input_ids, step=True) * decoder.embed_scale  # (B, 1, d)
            step = past[0].shape[2]  # positions already in the cache
            x = x + decoder.embed_positions.weight[step: step + 1]
            bias = padding_bias(attention_mask)
            present = []
            for i, layer in enumerate(decoder.layers):
                module = layer.self_attn
                out, keys, values = cached_attention(module.q_proj(x), module.k_proj(x), module.v_proj(x), past[2 * i],
                                                     past[2 * i + 1], module.num_heads, module.head_dim,
                                                     module.scaling)
                present += [keys, values]
                x = layer.self_attn_layer_norm(x + module.out_proj(out))
                x = layer.encoder_attn_layer_norm(x + attend(layer.encoder_attn, x, cross[2 * i], cross[2 * i + 1], bias,
                                                             True))
                x = feed_forward(layer, x)
            h = x[:, 0]  # (B, d)
            if not tied:
                logits = head(h)
            elif isinstance(head, LowRankLinear):
                logits = (h @ head.down.weight.t()) @ tab  # (B, d) @ (d, r) @ (r, V)
            else:
                logits = h @ tab  # (B, d) @ (d, V)
            logits = logits + self.final_logits_bias
            return (logits, *present)

    return Encoder().eval(), DecoderStep().eval()
