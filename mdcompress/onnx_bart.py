"""The step functions of the BART-like families for ``onnx_export``: MarianMT (shared or separate
vocabularies), M2M100/NLLB-200, mBART/mBART-50 and BART, dense or factorized by this tool.

``graphs(model)`` returns the two modules that ``torch.onnx`` traces (see ``onnx_export``):

- the encoder: (input_ids, attention_mask) → the cross-attention keys and values of every decoder
  layer, computed once per sentence;
- the decoder step: (input_ids (B, 1), attention_mask, the self-attention cache of each layer, the
  cross-attention keys and values) → (the next token's logits (B, V), the cache grown by one).

They restate the model's forward pass around its own modules (the factorized layers export as
their two small matrix products); all attention goes through ``onnx_attention``. What differs
between the families is read off the model (``layout``), never assumed from its name:

- where each sub-layer normalizes: its output (post-norm: Marian, BART) or its input (pre-norm:
  mBART, M2M100), by the class of the model's layers;
- the stacks' own layer norms: ``layernorm_embedding`` after the positions (mBART, BART) and a
  final ``layer_norm`` after the last layer (mBART, M2M100), where the encoder and decoder have them;
- the positions: a table read at row ``offset`` + position (Marian's sinusoids, offset 0; the learned
  ones of mBART and BART, offset 2), or M2M100's sinusoids, counted from the pad id: token k of a
  sequence (from 0) reads row ``pad + 1 + k`` (offset pad + 1), a pad token the zero row ``pad``;
- the embedding's scale: inside the embedding module (``embed_scale`` of M2M100's, mBART's and
  BART's scaled embeddings, kept by a factorized one) or applied by the stack (Marian's);
- the activation (the layers' ``activation_fn``, built from the config), ``final_logits_bias``
  where the model has one, and an output projection tied to the decoder's embedding or its own.

Sources are padded on the right (as ``translate`` and ``onnx_export`` pad them): M2M100's
positions are then those of its pad-counting rule.
"""

from __future__ import annotations

from mdcompress.errors import ExportError
from mdcompress.onnx_attention import attention, cached_attention, split_heads
from mdcompress.onnx_embedding import is_tied, project, rows, table

# The layer classes whose forward pass these step functions restate: whether they normalize the
# input of each sub-layer (pre-norm) or the sum after it (post-norm)
PRE_NORM = {"MarianEncoderLayer": False, "MarianDecoderLayer": False, "BartEncoderLayer": False,
            "BartDecoderLayer": False, "MBartEncoderLayer": True, "MBartDecoderLayer": True,
            "M2M100EncoderLayer": True, "M2M100DecoderLayer": True}
# Keys of configs written by transformers 3 that transformers 5 ignores: a MarianMTModel runs
# post-norm with no extra norms whatever they say, so a model trained with them is not the one PyTorch runs
_IGNORED_MARIAN_KEYS = ("normalize_before", "add_final_layer_norm", "normalize_embedding")


def _name(model) -> str:
    return f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r})"


def check(model) -> None:
    """Refuse, in one line, a model whose layout these step functions do not restate."""
    layout(model)


def layout(model) -> dict:
    """What differs between the families, read off ``model`` (see the module's docstring); a model
    laid out otherwise is refused in one line (``ExportError``)."""
    from torch import nn
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    inner = getattr(model, "model", None)
    encoder, decoder = getattr(inner, "encoder", None), getattr(inner, "decoder", None)
    if encoder is None or decoder is None or not hasattr(decoder, "layers"):
        raise ExportError(f"{_name(model)} cannot be exported: its encoder and decoder are not laid out as "
                          f"MarianMT's, M2M100's, mBART's or BART's (model.encoder, model.decoder)")
    config = model.config
    if getattr(config, "model_type", "").removesuffix("_low_rank") == "marian":
        set_keys = [key for key in _IGNORED_MARIAN_KEYS if getattr(config, key, False)]
        if set_keys:
            raise ExportError(f"{_name(model)} cannot be exported: its config sets {set_keys[0]}: true (a "
                              f"pre-norm Marian), which transformers' MarianMTModel ignores: PyTorch runs it "
                              f"post-norm, not as it was trained, and an export would repeat that")
    out = {}
    for side, stack in (("encoder", encoder), ("decoder", decoder)):
        kinds = {type(layer).__name__ for layer in stack.layers}
        if len(kinds) != 1 or not kinds <= set(PRE_NORM):
            known = ", ".join(k for k in PRE_NORM if k.endswith(f"{side.title()}Layer"))
            raise ExportError(f"{_name(model)} cannot be exported: its {side} layers are {', '.join(sorted(kinds))}; "
                              f"the exporter restates {known}")
        positions = stack.embed_positions
        if isinstance(positions, M2M100SinusoidalPositionalEmbedding):
            kind, offset = "sinusoidal-from-pad", int(positions.padding_idx) + 1  # the row of position 0
        elif isinstance(positions, nn.Embedding):
            kind, offset = "table", int(getattr(positions, "offset", 0))
        else:
            raise ExportError(f"{_name(model)} cannot be exported: its {side}'s positions are a "
                              f"{type(positions).__name__}, neither a table nor M2M100's sinusoids")
        inner, outer = _scales(stack)
        out[side] = {"pre_norm": PRE_NORM[kinds.pop()], "positions": kind, "offset": offset,
                     "layernorm_embedding": getattr(stack, "layernorm_embedding", None) is not None,
                     "final_layer_norm": getattr(stack, "layer_norm", None) is not None,
                     "embed_scale": inner * outer}
    return out


def _scales(stack) -> tuple[float, float]:
    """(the embedding module's own factor, the factor the stack applies after it): M2M100, mBART and
    BART scale inside their embedding (√d or 1), Marian in the stack."""
    inner = getattr(stack.embed_tokens, "embed_scale", None)
    outer = getattr(stack, "embed_scale", None)
    return (1.0 if inner is None else float(inner)), (1.0 if outer is None else float(outer))


def describe(model) -> dict:
    """What onnx_export.json says of the graphs: the model type, layers, heads, head_dim,
    max_positions (the longest source and translation the positions cover), vocab_size, and the
    layout of each stack (``layout``)."""
    attention_module = model.model.decoder.layers[0].self_attn
    return {"model_type": str(model.config.model_type).removesuffix("_low_rank"),
            "layers": len(model.model.decoder.layers), "heads": attention_module.num_heads,
            "head_dim": attention_module.head_dim, "max_positions": _max_positions(model),
            "vocab_size": int(model.get_output_embeddings().out_features), "layout": layout(model)}


def _max_positions(model) -> int:
    """Positions a sequence may have: a table's rows past its offset; M2M100's sinusoids have no end,
    and the config's max_position_embeddings bounds them (as the PyTorch translator bounds generate())."""
    limits = []
    for stack in (model.model.encoder, model.model.decoder):
        positions = stack.embed_positions
        if hasattr(positions, "weight"):
            limits.append(int(positions.weight.shape[0]) - int(getattr(positions, "offset", 0)))
    configured = getattr(model.config, "max_position_embeddings", None)
    return min(limits + ([int(configured)] if configured else []))


def _position_table(stack, max_positions: int):
    """The rows of ``stack``'s positions that positions 0 … max_positions - 1 read: (max_positions, d).
    M2M100's sinusoids are computed by its own ``get_embedding`` (the rows its buffer holds are
    checked against them)."""
    import torch

    positions = stack.embed_positions
    if hasattr(positions, "weight"):  # a table: Marian's sinusoids, the learned ones of mBART and BART
        offset = int(getattr(positions, "offset", 0))
        return positions.weight.detach()[offset: offset + max_positions].clone()
    pad = int(positions.padding_idx)
    rows = type(positions).get_embedding(pad + 1 + max_positions, positions.embedding_dim, pad)
    held = positions.weights.detach().to(rows.dtype)
    n = min(len(held), len(rows))
    assert torch.equal(held[:n], rows[:n]), "M2M100's sinusoid rows differ from its get_embedding"
    return rows[pad + 1:].clone()


def graphs(model):
    """(encoder module, decoder-step module) for ``model``, laid out as ``layout`` reads it."""
    import torch
    from torch import nn

    shape = layout(model)
    encoder, decoder = model.model.encoder, model.model.decoder
    neg = torch.finfo(torch.float32).min
    max_positions = _max_positions(model)

    def lookup(stack, tab, ids, step: bool = False):  # ids (B, T) → (B, T, d), scaled as the stack scales it
        embedding = stack.embed_tokens
        found = rows(embedding, tab, ids)
        inner, outer = _scales(stack)
        if inner * outer != 1.0:
            found = found * (inner * outer)
        return found.reshape(-1, 1, embedding.embedding_dim) if step else found.reshape(ids.shape[0], ids.shape[1], -1)

    def heads(x, module, step: bool):  # (B, T, D) → (B, H, T, Dh)
        return split_heads(x, module.num_heads, module.head_dim, step)

    def attend(module, query, keys, values, bias, step: bool):  # query (B, T, D); keys, values (B, H, S, Dh)
        out = attention(module.q_proj(query), keys, values, bias, module.num_heads, module.head_dim, module.scaling,
                        step)
        return module.out_proj(out)

    def sublayer(x, norm, pre_norm: bool, body):
        """One residual sub-layer: x + body(norm(x)) pre-norm, norm(x + body(x)) post-norm."""
        return x + body(norm(x)) if pre_norm else norm(x + body(x))

    def feed_forward(layer):
        return lambda x: layer.fc2(layer.activation_fn(layer.fc1(x)))

    def padding_bias(attention_mask):  # (B, S) → (B, 1, 1, S): 0 where real, the float minimum where padded
        return (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * neg

    def embed(stack, side: str, x, ids, positions):
        """Token vectors x (B, T, d) plus their position rows (T, d), then the stack's
        layernorm_embedding; M2M100's pad tokens read the zero row."""
        if shape[side]["positions"] == "sinusoidal-from-pad":  # its pad id: the row before position 0's
            pad = shape[side]["offset"] - 1
            positions = positions * (ids != pad).unsqueeze(-1).to(positions.dtype)  # (B, T, d)
        x = x + positions
        return stack.layernorm_embedding(x) if shape[side]["layernorm_embedding"] else x

    class Steps(nn.Module):  # the position rows of both stacks: initializers of the graphs (stored once
        def __init__(self):  # in weights.bin where equal, and kept float32 by int8), not constants inside them
            super().__init__()
            self.register_buffer("encoder_positions", _position_table(encoder, max_positions))
            self.register_buffer("decoder_positions", _position_table(decoder, max_positions))

    steps = Steps()
    pre_encoder, pre_decoder = shape["encoder"]["pre_norm"], shape["decoder"]["pre_norm"]

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder, self.steps = encoder, decoder, steps

        def forward(self, input_ids, attention_mask):
            x = lookup(encoder, table(encoder.embed_tokens), input_ids)
            x = embed(encoder, "encoder", x, input_ids, steps.encoder_positions[: input_ids.shape[1]])
            bias = padding_bias(attention_mask)
            for layer in encoder.layers:
                module = layer.self_attn

                def self_attention(h, module=module):
                    keys, values = heads(module.k_proj(h), module, False), heads(module.v_proj(h), module, False)
                    return attend(module, h, keys, values, bias, False)

                x = sublayer(x, layer.self_attn_layer_norm, pre_encoder, self_attention)
                x = sublayer(x, layer.final_layer_norm, pre_encoder, feed_forward(layer))
            if shape["encoder"]["final_layer_norm"]:
                x = encoder.layer_norm(x)
            cross = []
            for layer in decoder.layers:
                module = layer.encoder_attn
                cross += [heads(module.k_proj(x), module, False), heads(module.v_proj(x), module, False)]
            return tuple(cross)

    head = model.get_output_embeddings()
    tied = is_tied(head, decoder.embed_tokens)
    logits_bias = getattr(model, "final_logits_bias", None)

    class DecoderStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.head, self.steps = decoder, head, steps
            if logits_bias is not None:
                self.register_buffer("final_logits_bias", logits_bias.detach().clone(), persistent=False)

        def forward(self, input_ids, attention_mask, *cache):  # cache: self k, v per layer, then cross k, v per layer
            n = len(decoder.layers)
            past, cross = cache[: 2 * n], cache[2 * n:]
            tab = table(decoder.embed_tokens)
            step = past[0].shape[2]  # positions already in the cache
            x = lookup(decoder, tab, input_ids, step=True)  # (B, 1, d)
            x = embed(decoder, "decoder", x, input_ids, steps.decoder_positions[step: step + 1])
            padding = padding_bias(attention_mask)
            present = []
            for i, layer in enumerate(decoder.layers):
                module = layer.self_attn

                def self_attention(h, module=module, i=i):
                    out, keys, values = cached_attention(module.q_proj(h), module.k_proj(h), module.v_proj(h),
                                                         past[2 * i], past[2 * i + 1], module.num_heads,
                                                         module.head_dim, module.scaling)
                    present.extend([keys, values])
                    return module.out_proj(out)

                def cross_attention(h, layer=layer, i=i):
                    return attend(layer.encoder_attn, h, cross[2 * i], cross[2 * i + 1], padding, True)

                x = sublayer(x, layer.self_attn_layer_norm, pre_decoder, self_attention)
                x = sublayer(x, layer.encoder_attn_layer_norm, pre_decoder, cross_attention)
                x = sublayer(x, layer.final_layer_norm, pre_decoder, feed_forward(layer))
            if shape["decoder"]["final_layer_norm"]:
                x = decoder.layer_norm(x)
            h = x[:, 0]  # (B, d)
            logits = project(h, head, tab, tied)
            if logits_bias is not None:
                logits = logits + self.final_logits_bias
            return (logits, *present)

    return Encoder().eval(), DecoderStep().eval()
