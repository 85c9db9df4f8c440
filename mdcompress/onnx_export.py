"""Export a translation model (MarianMT, M2M100/NLLB-200, mBART/mBART-50, BART, T5/mT5/MADLAD-400),
compressed by this tool or not, to ONNX Runtime.

    python -m mdcompress.onnx_export --model outputs/compressed-en-de                 # → outputs/compressed-en-de/onnx
    python -m mdcompress.onnx_export --model outputs/compressed-en-de --int8          # → …/onnx-int8
    python -m mdcompress.onnx_export --model Helsinki-NLP/opus-mt-en-de --out opus-onnx

The folder holds two graphs, written by ``torch.onnx`` from the model's own modules (the
factorized layers export as their two small matrix products, never re-multiplied):

- ``encoder.onnx``: (input_ids, attention_mask) → the cross-attention keys and values of every
  decoder layer, computed once per sentence (as CTranslate2 does), so no decoder step repeats them.
  Sources are padded on the right.
- ``decoder.onnx``: one decoding step with a key/value cache: (input_ids (B, 1), attention_mask,
  the self-attention cache (B, H, P, Dh) of each layer, P = 0 at the first step, the cross-attention
  keys/values) → (the next token's logits (B, V), the cache grown by one position). Greedy search
  needs no softmax over the vocabulary; beam search takes it outside the graph.

Why by hand: no maintained exporter handles seq2seq models with a cache for transformers 5
(optimum's needs transformers < 4.58, and transformers' own cache classes do not trace), so each
family's two step functions restate its forward pass around the model's modules (``onnx_bart``:
MarianMT, M2M100/NLLB, mBART, BART; ``onnx_t5``; all attention through ``onnx_attention``),
as ``family(model)`` picks them; ``export`` then checks the graphs
against the PyTorch model before it writes anything. int8 is ONNX Runtime's dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``) of every MatMul and Gather weight, the embedding
and the output projection included (the position tables stay float32). Tensors that both graphs use
(the embedding, the positions) are stored once, in ``weights.bin``, which both graphs reference as
external data.

The folder also holds the tokenizer, ``config.json`` and ``generation_config.json`` of the model
(the decoder's start token, a forced target-language code, the search settings ``translate`` applies),
and ``onnx_export.json`` (what the graphs expect); ``translate.py`` runs it. The folder's layout,
which both read, is ``onnx_format``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

from mdcompress import onnx_attention
from mdcompress.errors import ExportError
from mdcompress.files import atomic_folder
from mdcompress.onnx_format import DECODER, ENCODER, EXPORT_INFO, FORMAT, WEIGHTS, default_folder, is_export, \
    load_model, read_info
from mdcompress.process import exit_with, program_name, quiet_transformers

PRECISIONS = ("float32", "int8")
INT8_TOLERANCE = 0.5  # of the logits' spread; see _verify and the measured errors in docs/deploying.md
OPSET = 17
ATTENTIONS = ("fused", "plain")  # onnx_attention: ONNX Runtime's MultiHeadAttention nodes, or standard operators
ATTENTION = "fused"


# ---------------------------------------------------------------------------------------------
# The step functions of each family (onnx_bart, onnx_t5): check(model), describe(model), graphs(model)

_FAMILIES = {"marian": "mdcompress.onnx_bart", "m2m_100": "mdcompress.onnx_bart", "mbart": "mdcompress.onnx_bart",
             "bart": "mdcompress.onnx_bart", "t5": "mdcompress.onnx_t5", "mt5": "mdcompress.onnx_t5"}


def _import_torch():
    import torch
    from torch import nn

    return torch, nn


def family(model):
    """The module that writes ``model``'s step functions; a model it cannot restate is refused in one line."""
    import importlib

    model_type = str(getattr(model.config, "model_type", None)).removesuffix("_low_rank")  # this tool's factorized types
    if model_type not in _FAMILIES:
        raise ExportError(f"{type(model).__name__} (model_type {model_type!r}) cannot be exported: supported are "
                          f"the model types {', '.join(sorted(_FAMILIES))}")
    module = importlib.import_module(_FAMILIES[model_type])
    module.check(model)
    return module


def _check_exportable(model) -> None:
    """Refuse, in one line, a model whose step functions cannot be written, or whose generation config
    asks for a search setting the ONNX translator does not apply (its translations would not be PyTorch's)."""
    from mdcompress.translate import NOT_APPLIED

    family(model)
    generation = getattr(model, "generation_config", None)
    for key, off in NOT_APPLIED.items():
        value = getattr(generation, key, None)
        if value not in (None, off, []):
            raise ExportError(f"the model's generation config sets {key} {value!r}, which the ONNX translator does "
                              f"not apply (its translations would differ from PyTorch's); remove it from its "
                              f"generation_config.json to export it")


# ---------------------------------------------------------------------------------------------
# Export


def _names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    cross = [f"cross_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    return past, cross


def _export_graphs(model, folder: Path, attention: str = "plain") -> dict:
    """Write encoder.onnx and decoder.onnx (float32, weights inline) into ``folder``, their attention
    ``attention`` (``onnx_attention``); returns the description that goes into onnx_export.json."""
    torch, _ = _import_torch()
    builder = family(model)
    encoder, step = builder.graphs(model)
    description = builder.describe(model)
    config = model.config
    n = description["layers"]
    past_names, cross_names = _names(n)
    present_names = [name.replace("past_", "present_") for name in past_names]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, config.eos_token_id, config.pad_token_id]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.long)
    opsets = onnx_attention.FUSED_OPSETS if attention == "fused" else None
    with torch.no_grad(), warnings.catch_warnings(), onnx_attention.fused(attention == "fused") as unfused:
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        cross = encoder(ids, mask)
        past = [torch.zeros(2, description["heads"], 3, description["head_dim"]) for _ in past_names]
        axes = {"input_ids": {0: "batch", 1: "source"}, "attention_mask": {0: "batch", 1: "source"},
                **{name: {0: "batch", 2: "source"} for name in cross_names}}
        torch.onnx.export(encoder, (ids, mask), str(folder / ENCODER), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=cross_names,
                          dynamic_axes=axes, do_constant_folding=True, custom_opsets=opsets)
        step_ids = torch.tensor([[5], [6]], dtype=torch.long)
        axes = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch", 1: "source"}, "logits": {0: "batch"},
                **{name: {0: "batch", 2: "past"} for name in past_names},
                **{name: {0: "batch", 2: "past+1"} for name in present_names},
                **{name: {0: "batch", 2: "source"} for name in cross_names}}
        torch.onnx.export(step, (step_ids, mask, *past, *cross), str(folder / DECODER), dynamo=False,
                          opset_version=OPSET, input_names=["input_ids", "attention_mask", *past_names, *cross_names],
                          output_names=["logits", *present_names], dynamic_axes=axes, do_constant_folding=True,
                          custom_opsets=opsets)
    if unfused:
        raise ExportError(f"the fused operator does not take {unfused[0]}")
    return {**description, "attention": attention, "past": past_names, "present": present_names,
            "cross": cross_names}


def _quantize(folder: Path) -> None:
    """Replace both graphs by ONNX Runtime's dynamic int8 quantization of their MatMul and Gather
    weights (activations are quantized on the fly; weight matrices with a scale per column)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run a pre-processing step, printed for every graph
    try:
        for name in (ENCODER, DECODER):
            source = folder / name
            target = folder / f"{name}.int8"
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                             per_channel=True)  # a scale per output column: on the shipped 50% student,
            # 0.22 BLEU below float32 instead of 0.53 per tensor, at the same speed (1,000 held-out pairs)
            os.replace(target, source)
    finally:
        root.setLevel(level)


def _store_shared(folder: Path) -> None:
    """Move every initializer of encoder.onnx and decoder.onnx above 1 KiB into one ``weights.bin``,
    each distinct tensor once (the embedding both graphs use is stored once), referenced as
    external data."""
    import onnx
    from onnx.external_data_helper import set_external_data

    models = {name: onnx.load(str(folder / name)) for name in (ENCODER, DECODER)}
    offsets: dict[str, tuple[int, int]] = {}
    with open(folder / WEIGHTS, "wb") as data:
        for model in models.values():
            for tensor in model.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < 1024:
                    continue
                key = hashlib.sha256(raw).hexdigest()
                if key not in offsets:
                    data.write(b"\0" * (-data.tell() % 64))  # aligned, for memory mapping
                    offsets[key] = (data.tell(), len(raw))
                    data.write(raw)
                set_external_data(tensor, WEIGHTS, offset=offsets[key][0], length=offsets[key][1])
                tensor.ClearField("raw_data")
    for name, model in models.items():
        onnx.save(model, str(folder / name))


def _verify(model, folder: Path, tolerance: float, quantized: bool = False) -> float:
    """Run the exported graphs on a few sentences-worth of ids and compare their next-token logits
    with the PyTorch model's (teacher-forced, four steps). float32 graphs: returns the largest
    difference and refuses the export above ``tolerance`` times the logits' scale (their largest
    magnitude, at least 1), which summation order cannot reach and a wrong graph far exceeds.
    Quantized graphs (``quantized``): returns the largest relative error of a step's logits,
    |onnx - torch| / |torch - its mean| (Euclidean norms over the vocabulary), and refuses it above
    ``tolerance``: int8 rounding moves the logits by a few percent of their spread, a wrong graph by
    about their spread or more."""
    import numpy as np
    import onnxruntime as ort

    torch, _ = _import_torch()
    info = read_info(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    encoder = ort.InferenceSession(str(folder / ENCODER), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / DECODER), options, providers=["CPUExecutionProvider"])
    config = model.config
    generator = torch.Generator().manual_seed(0)
    # source ids from the encoder's vocabulary, target ids from the decoder's: they differ where the
    # vocabularies are separate (the OPUS-MT "tc-big" layout)
    source_vocab = model.get_encoder().embed_tokens.num_embeddings
    vocab = info["vocab_size"]
    ids = torch.randint(2, max(3, source_vocab - 1), (3, 7), generator=generator)
    ids[ids == config.pad_token_id] = config.eos_token_id  # pad ids only where padded (M2M100 counts positions so)
    ids[:, -1] = config.eos_token_id
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = config.pad_token_id
    targets = torch.randint(2, max(3, vocab - 1), (3, 3), generator=generator)
    targets[targets == config.pad_token_id] = config.eos_token_id
    start = getattr(config, "decoder_start_token_id", None)  # a T5 config may leave it to the generation config
    start = model.generation_config.decoder_start_token_id if start is None else start
    decoder_ids = torch.cat([torch.full((3, 1), start), targets], dim=1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    cross = encoder.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    past = [np.zeros((3, info["heads"], 0, info["head_dim"]), np.float32) for _ in info["past"]]
    worst, scale = 0.0, 1.0
    for t in range(decoder_ids.shape[1]):
        feed = {"input_ids": decoder_ids[:, t:t + 1].numpy(), "attention_mask": mask.numpy(),
                **dict(zip(info["past"], past)), **dict(zip(info["cross"], cross))}
        logits, *past = decoder.run(None, feed)
        want = expected[:, t].numpy()
        if quantized:
            spread = np.linalg.norm(want - want.mean(axis=-1, keepdims=True), axis=-1)
            worst = max(worst, float((np.linalg.norm(logits - want, axis=-1) / np.maximum(spread, 1e-12)).max()))
        else:
            worst = max(worst, float(np.abs(logits - want).max()))
            scale = max(scale, float(np.abs(want).max()))
    if quantized and not (math.isfinite(worst) and worst <= tolerance):
        raise ExportError(f"the int8 graphs differ from the PyTorch model by {worst:.2g} of the logits' spread "
                          f"(allowed {tolerance:g}: int8 rounding stays well below); the quantization broke "
                          f"this model's graphs, export it in float32")
    if not quantized and not (math.isfinite(worst) and worst <= tolerance * scale):
        raise ExportError(f"the exported graphs differ from the PyTorch model by {worst:.2g} in the logits "
                          f"(allowed {tolerance * scale:.2g}); this model has a layout the exporter does not handle")
    return worst


def _fused_or_plain(model, folder: Path, attention: str, header: dict) -> dict:
    """Write the graphs with ``attention`` and check them against PyTorch: ``header`` and the
    description for onnx_export.json, with ``max_abs_diff``. Fused graphs that cannot be written,
    loaded or run, or that compute something else, are written again plain; ``attention_fallback``
    says why."""
    if attention == "fused":
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
        from torch.onnx.errors import OnnxExporterError

        try:
            info = {**header, **_export_graphs(model, folder, "fused")}
            (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
            return {**info, "max_abs_diff": _verify(model, folder, tolerance=1e-3)}
        except (ExportError, OnnxExporterError, ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph,
                ort_errors.NotImplemented, ort_errors.RuntimeException) as e:
            fallback = f"fused attention refused ({str(e).splitlines()[0][:200]}); written plain"
    info = {**header, **_export_graphs(model, folder, "plain")}
    if attention == "fused":
        info["attention_fallback"] = fallback
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "max_abs_diff": _verify(model, folder, tolerance=1e-3)}


def export(model_path: str | os.PathLike, out: str | os.PathLike | None = None, precision: str = "float32",
           overwrite: bool = False, model=None, tokenizer=None, attention: str = ATTENTION) -> Path:
    """Export the model in ``model_path`` (a folder written by this tool, any model folder of the
    families ``family`` takes, or a hub id; or ``model`` and ``tokenizer`` given directly) to ONNX
    Runtime in ``precision`` (float32 or int8) into the folder ``out`` (default: ``onnx`` /
    ``onnx-int8`` inside the model folder), its attention ``attention`` (fused: ONNX Runtime's
    MultiHeadAttention operator, or plain; see ``onnx_attention``). The folder appears whole or not
    at all. Returns its path."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if attention not in ATTENTIONS:
        raise ExportError(f"attention: {attention!r} is not one of {', '.join(ATTENTIONS)}")
    out = Path(out) if out is not None else default_folder(model_path, precision)
    check_out(out, overwrite)
    if model is None:
        model, tokenizer = load_model(str(model_path))
    _check_exportable(model)
    model = model.float().cpu().eval()
    with atomic_folder(out) as work:  # an earlier export (--overwrite) is replaced only once this one is whole
        # the graphs checked against PyTorch before anything is written, in both precisions: int8
        # quantizes graphs that computed what the model computes
        info = _fused_or_plain(model, work, attention, {"format": FORMAT, "precision": precision,
                                                        "source": str(model_path), "opset": OPSET})
        if precision == "int8":
            info["max_abs_diff_before_int8"] = info.pop("max_abs_diff")
            _quantize(work)
            info["int8_relative_error"] = _verify(model, work, INT8_TOLERANCE, quantized=True)
        _store_shared(work)
        (work / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        model.config.save_pretrained(work)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(work)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
    return out


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists, unless it is an earlier export and ``overwrite`` is given."""
    if out.exists() and not (overwrite and is_export(out)):
        what = "an ONNX export; pass --overwrite to replace it" if is_export(out) else \
            "not an ONNX export of this tool, so it is never replaced"
        raise ExportError(f"output folder {str(out)!r} exists and is {what}")




def main(argv: list[str] | None = None) -> int:
    prog = program_name() if argv is None else "onnx_export.py"  # called from Python: the module's file
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder written by compress_model.py, or a MarianMT, "
                        "M2M100/NLLB, mBART, BART, T5 or mT5 folder or hub id")
    parser.add_argument("--out", default=None, help="output folder (default: <model>/onnx or <model>/onnx-int8)")
    parser.add_argument("--int8", action="store_true", help="quantize the weights to int8 (ONNX Runtime dynamic quantization)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--attention", choices=ATTENTIONS, default=ATTENTION,
                        help=f"fused: ONNX Runtime's MultiHeadAttention operator; plain: standard ONNX operators "
                             f"(default {ATTENTION})")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    precision = "int8" if args.int8 else "float32"
    target = Path(args.out) if args.out else default_folder(args.model, precision)
    existed = target.exists()
    try:
        quiet_transformers()  # imports transformers: Ctrl-C may come already
        if args.out is None and not Path(args.model).is_dir():
            raise ExportError(f"--out is needed when --model is a hub id: {args.model!r} is no local folder (looked "
                              f"for {os.path.abspath(args.model)!r}); give --out, or the path of a model folder")
        check_out(target, args.overwrite)
        out = export(args.model, args.out, precision, overwrite=args.overwrite, attention=args.attention)
    except ExportError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (as compress_model.py); export() removed its work
        what = f"{str(target)!r} is left as it was" if existed else f"nothing written to {str(target)!r}"
        print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
    fallback = read_info(out).get("attention_fallback")
    if fallback:
        print(f"{prog}: note: {fallback}", file=sys.stderr)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    exit_with(main())
