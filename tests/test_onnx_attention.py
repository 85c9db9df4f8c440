"""Fused attention in the ONNX exports (``onnx_attention``): ONNX Runtime's MultiHeadAttention node
computes what the plain operators compute for every shape the step functions give it (padding and
T5-style biases, scale 1, an empty or a filled cache), fused and plain exports translate as PyTorch's
``generate()`` (greedy and beam), int8 quantizes a fused graph, and a fused graph ONNX Runtime
refuses is written plain, saying so."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import benchmark_in_process, varied_
from matrix_decomposition import decompose_, save_compressed_model
from mdcompress import onnx_attention
from mdcompress.onnx_attention import FUSED_OPSETS, attention, cached_attention, fused
from mdcompress.onnx_export import ExportError, export
from mdcompress.translate import load_translator, translate_lines

NEG = torch.finfo(torch.float32).min
B, H, DH, S, P = 3, 2, 4, 5, 3


def padding(batch: int = B) -> torch.Tensor:
    """(B, 1, 1, S): the second sentence padded after 2 tokens, the others whole."""
    bias = torch.zeros(batch, 1, 1, S)
    bias[1, ..., 2:] = NEG
    return bias


class Attend(torch.nn.Module):
    """One call of ``attention`` or ``cached_attention``, its bias built from the inputs as a
    family's step functions build it."""

    def __init__(self, kind: str, t: int):
        super().__init__()
        self.kind, self.step = kind, t == 1

    def forward(self, query, keys, values, position_bias):
        if self.kind == "cached":  # keys, values: the past (B, H, P, Dh); query's new key and value from it
            return cached_attention(query, 2 * query, -query, keys, values, H, DH, DH ** -0.5)
        if self.kind == "cached_t5":  # T5's self-attention step: scale 1, a position bias (1, H, 1, P+1)
            return cached_attention(query, 2 * query, -query, keys, values, H, DH, 1.0, bias=position_bias)
        if self.kind == "t5":  # relative position bias (1, H, T, S) plus padding (B, 1, 1, S), scale 1
            return attention(query, keys, values, position_bias + padding(), H, DH, 1.0, self.step)
        return attention(query, keys, values, padding(), H, DH, DH ** -0.5, self.step)


@pytest.mark.parametrize("kind, t", [("padding", 1), ("padding", 4), ("t5", 1), ("t5", 4), ("cached", 1),
                                     ("cached_t5", 1)])
def test_the_fused_node_computes_what_the_plain_operators_compute(kind, t, tmp_path):
    generator = torch.Generator().manual_seed(0)
    cached = kind.startswith("cached")
    length = P if cached else S
    inputs = (torch.randn(B, t, H * DH, generator=generator), torch.randn(B, H, length, DH, generator=generator),
              torch.randn(B, H, length, DH, generator=generator),
              torch.randn(1, H, t, length + 1 if cached else length, generator=generator))
    module = Attend(kind, t)
    expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    path = tmp_path / "attention.onnx"
    names = ["query", "keys", "values", "position_bias"]
    with torch.no_grad(), warnings.catch_warnings(), fused() as unfused:
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=17, input_names=names,
                          custom_opsets=FUSED_OPSETS)
    assert unfused == []
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("MultiHeadAttention") == 1
    assert not {"Softmax", "MatMul"} & {n.op_type for n in graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    assert len(got) == len(expected) == (3 if cached else 1)
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
        np.testing.assert_allclose(g, e.numpy(), atol=1e-5)


def test_a_bias_the_fused_node_does_not_take_is_written_plain_and_said():
    query, keys = torch.randn(B, 1, H * DH), torch.randn(B, H, S, DH)
    bias = torch.zeros(1, 1, S)  # 3-D: broadcasts in PyTorch, not in the fused operator
    with fused() as unfused:
        out = attention(query, keys, keys, bias, H, DH, 0.5, True)
    assert len(unfused) == 1 and "(1, 1, 5)" in unfused[0]
    torch.testing.assert_close(out, attention(query, keys, keys, None, H, DH, 0.5, True))
    assert onnx_attention._fused is False  # the switch is off again outside the block


@pytest.fixture(params=["dense", "factorized"])
def model_dir(request, tmp_path, make_tiny_marian, tiny_tokenizer):
    model = make_tiny_marian()
    if request.param == "factorized":
        decompose_(model, ["*"], k_info=4)
    save_compressed_model(varied_(model, 0.3 if request.param == "dense" else 0.5), tmp_path / "model",
                          tiny_tokenizer)
    return tmp_path / "model"


def ops(folder, graph: str) -> list[str]:
    return [n.op_type for n in onnx.load(str(folder / graph), load_external_data=False).graph.node]


def test_fused_and_plain_exports_translate_as_pytorch_greedy_and_beam(model_dir, tiny_pairs, tmp_path):
    sources = [s for s, _ in tiny_pairs[:48]]
    torch_translator = load_translator(model_dir)
    expected = {beams: translate_lines(torch_translator, sources, batch_size=16, num_beams=beams, max_new_tokens=12)
                for beams in (1, 3)}
    assert len(set(expected[1])) > 10  # the model says different things for different inputs
    for attention_kind in ("fused", "plain"):
        folder = export(model_dir, tmp_path / attention_kind, attention=attention_kind)
        info = json.loads((folder / "onnx_export.json").read_text())
        assert info["attention"] == attention_kind and "attention_fallback" not in info
        assert info["max_abs_diff"] < 1e-4
        layers = info["layers"]
        counts = [ops(folder, graph).count("MultiHeadAttention") for graph in ("encoder.onnx", "decoder.onnx")]
        # one node per encoder self-attention; per decoder layer, its self-attention and cross-attention
        assert counts == ([layers, 2 * layers] if attention_kind == "fused" else [0, 0])
        if attention_kind == "fused":
            assert "Softmax" not in ops(folder, "decoder.onnx") and "Concat" not in ops(folder, "decoder.onnx")
        onnx_translator = load_translator(folder)
        for beams in (1, 3):
            got = translate_lines(onnx_translator, sources, batch_size=16, num_beams=beams, max_new_tokens=12)
            assert got == expected[beams], (attention_kind, beams)


def test_int8_quantizes_a_fused_export_that_passed_its_check(model_dir, tiny_pairs, tmp_path):
    folder = export(model_dir, tmp_path / "int8", "int8", attention="fused")
    info = json.loads((folder / "onnx_export.json").read_text())
    assert info["attention"] == "fused" and info["precision"] == "int8" and info["max_abs_diff_before_int8"] < 1e-4
    decoder_ops = ops(folder, "decoder.onnx")
    assert decoder_ops.count("MultiHeadAttention") == 2 * info["layers"] and "MatMulInteger" in decoder_ops
    plain = export(model_dir, tmp_path / "int8-plain", "int8", attention="plain")
    sources = [s for s, _ in tiny_pairs[:48]]
    got, base = (translate_lines(load_translator(f), sources, batch_size=16, max_new_tokens=12) for f in (folder, plain))
    assert sum(a == b for a, b in zip(got, base)) >= 0.9 * len(sources)  # the same weights, quantized the same way


def test_fused_graphs_onnx_runtime_refuses_are_written_plain_saying_why(tiny_teacher_dir, tiny_pairs, tmp_path,
                                                                       monkeypatch, capsys):
    """A runtime without the fused operator's version (here: an opset version no ONNX Runtime has)
    refuses the graphs; the export command writes them plain, and says why in a line and in
    onnx_export.json."""
    from mdcompress import onnx_export

    monkeypatch.setattr(onnx_attention, "FUSED_OPSETS", {onnx_attention.FUSED_DOMAIN: 999})
    folder = tmp_path / "onnx"
    assert onnx_export.main(["--model", str(tiny_teacher_dir), "--out", str(folder), "--attention", "fused"]) == 0
    info = json.loads((folder / "onnx_export.json").read_text())
    assert info["attention"] == "plain" and info["attention_fallback"].startswith("fused attention refused (")
    err = capsys.readouterr().err
    assert err == f"onnx_export.py: note: {info['attention_fallback']}\n"
    assert "MultiHeadAttention" not in ops(folder, "decoder.onnx")
    sources = [s for s, _ in tiny_pairs[:16]]
    assert translate_lines(load_translator(folder), sources, max_new_tokens=12) == \
        translate_lines(load_translator(tiny_teacher_dir), sources, max_new_tokens=12)


def test_export_refuses_an_unknown_attention_in_one_line(tiny_teacher_dir, tmp_path, capsys):
    from mdcompress import onnx_export

    with pytest.raises(ExportError, match=r"^attention: 'flash' is not one of fused, plain$"):
        export(tiny_teacher_dir, tmp_path / "onnx", attention="flash")
    with pytest.raises(SystemExit) as exit_info:
        onnx_export.main(["--model", str(tiny_teacher_dir), "--out", str(tmp_path / "onnx"), "--attention", "flash"])
    assert exit_info.value.code == 2 and "--attention: invalid choice: 'flash'" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_bench_attention_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_attention.py", tmp_path, capsys, "--quick", "--work", str(tmp_path / "w"))
    systems = [f"{role} int8 {kind}" for role in ("dense", "student") for kind in ("fused", "plain")]
    assert [(row["system"], row["clock"]) for row in report["systems"]] == \
        [(name, clock) for clock in ("wall", "cpu") for name in systems]
    for row in report["systems"]:
        assert row["sent_per_s_b32"] > 0 and row["sent_per_s_b1"] > 0
        assert row["spread_b32"][0] <= row["sent_per_s_b32"] <= row["spread_b32"][1]
        if row["system"].endswith("plain"):
            assert row["vs_plain_b32"] == row["vs_plain_b1"] == 1.0
    for name, profile in report["step_profile"].items():  # the fused steps spend time in the fused nodes
        fused_ops = {"MultiHeadAttention (self)", "MultiHeadAttention (cross)"}
        assert (fused_ops <= set(profile["ms"])) == name.endswith("fused")
    assert set(report["step_ms"]) == {"32", "1"}
    assert all(set(times) == set(systems) and min(times.values()) > 0 for times in report["step_ms"].values())
    assert "| student int8 fused | cpu |" in out
