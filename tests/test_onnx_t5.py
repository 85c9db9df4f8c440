"""ONNX Runtime export of T5, mT5 and MADLAD-400's layout (``onnx_t5``), dense and factorized:
greedy and beam translations of the export equal PyTorch's ``generate()``, the factorized layers stay
factorized, int8 exports, the relative position bias stays right far beyond its buckets in the
encoder and the decoder, and a compression run exports its T5 student."""

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import sentencepiece as spm
import torch
from helpers import FAMILIES, T5_LIKE, T5_NAMES, Family, save_model_folder, varied_
from transformers import AutoTokenizer, T5Config
from transformers.models.t5.modeling_t5 import T5Attention

from matrix_decomposition import decompose_, save_compressed_model
from mdcompress.onnx_export import export
from mdcompress.onnx_t5 import scales_output
from mdcompress.translate import load_translator, translate_lines

RANK = 4
# the noise added to the tiny random models (``varied_``): enough that each says different things for
# different sources (the tests assert it), not so much that it says nothing
NOISE = {"t5": 0.5, "mt5": 0.3, "madlad": 0.3}
BY_NAME = {f.name: f for f in FAMILIES}
# MADLAD-400's layout: T5 v1.1 (gated feed-forward, tie_word_embeddings false: no d_model^-0.5 before the
# head) with an untied head, as a T5 model, not mT5
MADLAD = Family("madlad", T5Config, {**T5_LIKE, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
                linears=(7, 11), tied_head=False, **T5_NAMES)
T5_FAMILIES = [pytest.param(BY_NAME[name], id=name) for name in ("t5", "mt5")]


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory, tiny_pairs):
    """A T5 tokenizer (pad 0, </s> 1, the 100 sentinel tokens) on a unigram sentencepiece model
    trained on the pairs, loaded from its folder as the export loads it."""
    folder = tmp_path_factory.mktemp("t5-spm")
    (folder / "input.txt").write_text("\n".join(s for pair in tiny_pairs for s in pair), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "input.txt"), model_prefix=str(folder / "sp"), vocab_size=300,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2, num_threads=1,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    shutil.move(folder / "sp.model", folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    return AutoTokenizer.from_pretrained(folder)


def saved(family, tokenizer, folder, factorized: bool, **config):
    """A tiny ``family`` model with ``config`` on top of the family's, varied and saved in ``folder``:
    dense as a teacher comes (``save_pretrained``), or with every linear, the shared embedding and
    an untied head factorized at rank 4 and saved by this tool."""
    family = dataclasses.replace(family, kwargs={**family.kwargs, **config})
    model = family.make(tokenizer)
    if factorized:
        ranks = decompose_(model, ["*"], k_info=RANK)
        assert "shared" in ranks and ("lm_head" in ranks) is not family.tied_head
        save_compressed_model(varied_(model, NOISE[family.name]), folder, tokenizer)
    else:
        save_model_folder(varied_(model, NOISE[family.name]), tokenizer, folder)
    return folder


def initializers(folder):
    return [t for name in ("encoder.onnx", "decoder.onnx")
            for t in onnx.load(str(folder / name), load_external_data=False).graph.initializer]


@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "factorized"])
@pytest.mark.parametrize("family", [*T5_FAMILIES, pytest.param(MADLAD, id="madlad")])
def test_onnx_translations_equal_pytorch_greedy_and_beam(family, factorized, t5_tokenizer, tiny_pairs, tmp_path):
    folder = saved(family, t5_tokenizer, tmp_path / "model", factorized)
    model = load_translator(folder).model
    head, embedding = model.lm_head, model.shared
    tied = head.up.weight is embedding.up.weight if factorized else head.weight is embedding.weight
    assert tied is family.tied_head and scales_output(model) is (family.name == "t5")  # the head as the family has it
    onnx_dir = export(folder, tmp_path / "onnx")
    info = json.loads((onnx_dir / "onnx_export.json").read_text())
    assert info["max_abs_diff"] < 1e-4 and info["max_positions"] is None and info["vocab_size"] == len(t5_tokenizer)
    sources = [s for s, _ in tiny_pairs[:12]]
    torch_translator, onnx_translator = load_translator(folder), load_translator(onnx_dir)
    assert onnx_translator.backend == "onnx" and onnx_translator.start == t5_tokenizer.pad_token_id  # from pad
    for beams in (1, 3):
        expected = translate_lines(torch_translator, sources, batch_size=5, num_beams=beams, max_new_tokens=12)
        got = translate_lines(onnx_translator, sources, batch_size=5, num_beams=beams, max_new_tokens=12)
        assert len(set(expected)) > 4  # the model says different things for different inputs
        assert got == expected, beams
    if factorized:  # the factors are exported as they are: no matrix the size of a re-multiplied one
        shapes = [tuple(t.dims) for t in initializers(onnx_dir) if len(t.dims) == 2]
        assert shapes and all(min(s) <= RANK for s in shapes), shapes


@pytest.mark.parametrize("family", T5_FAMILIES)
def test_int8_export_passes_its_check_and_translates(family, t5_tokenizer, tiny_pairs, tmp_path):
    folder = saved(family, t5_tokenizer, tmp_path / "model", factorized=True)
    int8 = export(folder, tmp_path / "onnx-int8", "int8")
    info = json.loads((int8 / "onnx_export.json").read_text())
    assert info["precision"] == "int8" and info["max_abs_diff_before_int8"] < 1e-4  # float32 graphs checked first
    ops = {n.op_type for n in onnx.load(str(int8 / "decoder.onnx"), load_external_data=False).graph.node}
    assert "MatMulInteger" in ops
    sources = [s for s, _ in tiny_pairs[:12]]
    got = translate_lines(load_translator(int8), sources, max_new_tokens=12)
    assert len(got) == len(sources) and all(got)


def step_logits(folder, ids, mask, decoder_ids):
    """The export's next-token logits (B, T, V) for teacher-forced ``decoder_ids`` (B, T), one step at a time."""
    info = json.loads((folder / "onnx_export.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    encoder, decoder = (ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
                        for name in ("encoder.onnx", "decoder.onnx"))
    cross = encoder.run(None, {"input_ids": ids, "attention_mask": mask})
    past = [np.zeros((ids.shape[0], info["heads"], 0, info["head_dim"]), np.float32) for _ in info["past"]]
    logits = []
    for t in range(decoder_ids.shape[1]):
        feed = {"input_ids": decoder_ids[:, t:t + 1], "attention_mask": mask, **dict(zip(info["past"], past)),
                **dict(zip(info["cross"], cross))}
        out, *past = decoder.run(None, feed)
        logits.append(out)
    return np.stack(logits, axis=1)


@pytest.mark.parametrize("family", T5_FAMILIES)
def test_relative_bias_is_right_beyond_the_buckets(family, t5_tokenizer, tmp_path):
    """With relative_attention_max_distance 6 every distance from 6 on shares the last bucket: sources of
    20 tokens and 30 decoding steps go far past it (and past the 8 buckets), in both stacks."""
    folder = saved(family, t5_tokenizer, tmp_path / "model", factorized=False, relative_attention_max_distance=6)
    onnx_dir = export(folder, tmp_path / "onnx")
    steps, length = 30, 20
    causal = T5Attention._relative_position_bucket(-torch.arange(steps), bidirectional=False, num_buckets=8,
                                                   max_distance=6)
    bidirectional = T5Attention._relative_position_bucket(torch.arange(-length + 1, length), bidirectional=True,
                                                          num_buckets=8, max_distance=6)
    assert (causal == 7).sum() > 20 and (bidirectional == 3).sum() > 10 and (bidirectional == 7).sum() > 10
    generator = torch.Generator().manual_seed(2)
    vocab = len(t5_tokenizer)
    ids = torch.randint(3, vocab, (3, length), generator=generator)
    ids[:, -1] = t5_tokenizer.eos_token_id
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    ids[2, 14:] = t5_tokenizer.pad_token_id
    decoder_ids = torch.cat([torch.full((3, 1), t5_tokenizer.pad_token_id),
                             torch.randint(3, vocab, (3, steps - 1), generator=generator)], dim=1)
    translator = load_translator(folder)
    with torch.no_grad():
        expected = translator.model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    got = step_logits(onnx_dir, ids.numpy(), mask.numpy(), decoder_ids.numpy())
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
    # and the searches, made to go on for 30 tokens
    onnx_translator = load_translator(onnx_dir)
    for beams in (1, 3):
        want = translator.generate(ids.numpy(), mask.numpy(), beams, max_new_tokens=steps, min_new_tokens=steps)
        have = onnx_translator.generate(ids.numpy(), mask.numpy(), beams, max_new_tokens=steps, min_new_tokens=steps)
        assert [len(row) for row in want] == [steps] * 3 and have == want, beams


def test_a_compression_run_of_an_mt5_teacher_exports_and_scores_its_student(t5_tokenizer, tiny_pairs, tmp_path,
                                                                              monkeypatch):
    """The CLI on a tiny mT5 teacher with ``export: ["onnx"]``: the factorized student is exported with the
    run, and its export scores what the PyTorch student scores, with the same translations."""
    import compress_model
    from mdcompress.data import write_pairs

    teacher = saved(BY_NAME["mt5"], t5_tokenizer, tmp_path / "teacher", factorized=False)
    write_pairs(tmp_path / "train.csv", tiny_pairs[:16])
    write_pairs(tmp_path / "eval.csv", tiny_pairs[100:112])
    (tmp_path / "config.json").write_text(json.dumps({
        "teacher_model_path": str(teacher), "dataset_path": "train.csv", "eval_dataset_path": "eval.csv",
        "output_path": "out", "progress": False, "max_steps": 1, "batch_size": 8, "max_new_tokens": 8,
        "checkpoint_steps": 0, "num_threads": 1, "decompose_layers": ["*"], "k_info": RANK, "export": ["onnx"]}))
    monkeypatch.chdir(tmp_path)
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "export_failed" not in report and "shared" in report["ranks"] and "lm_head" in report["ranks"]
    row, student = report["student_onnx"], report["student"]
    assert (row["bleu"], row["chrf"]) == (student["bleu"], student["chrf"]) and student["chrf"] > 0
    sources = [s for s, _ in tiny_pairs[100:112]]
    expected = translate_lines(load_translator(tmp_path / "out"), sources, max_new_tokens=8)
    assert translate_lines(load_translator(tmp_path / "out" / "onnx"), sources, max_new_tokens=8) == expected


@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 6), (8, 128), (16, 16)])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
def test_the_bucket_table_clipped_gives_t5s_buckets_at_every_distance(buckets, distance, bidirectional):
    """The graphs look a relative position up in ``bucket_table``, clipped to its bound: the bucket
    T5's own function gives, for every position from −2000 to 2000."""
    from transformers import T5Config

    from mdcompress.onnx_t5 import bucket_table

    config = T5Config(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance)
    module = T5Attention(config, has_relative_attention_bias=True)
    table, bound = bucket_table(module, bidirectional)
    relative = torch.arange(-2000, 2001) if bidirectional else -torch.arange(2001)  # key − query
    expected = T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=buckets,
                                                     max_distance=distance)
    index = relative.clamp(-bound, bound) + bound if bidirectional else (-relative).clamp(max=bound)
    assert torch.equal(table[index], expected)
    assert expected.max() == buckets - 1 and len(set(expected.tolist())) > buckets // 2  # the far ones reached


def test_a_relative_bias_in_every_layer_is_refused_in_one_line(t5_tokenizer, tmp_path):
    """Relative bias tables held otherwise than by the first layer of each stack (umT5 has one in every
    layer) are not what the exporter restates: refused in one line, before anything is written."""
    from mdcompress.onnx_export import ExportError

    model = BY_NAME["t5"].make(t5_tokenizer)
    second = model.encoder.block[1].layer[0].SelfAttention
    second.has_relative_attention_bias = True
    second.relative_attention_bias = torch.nn.Embedding(second.relative_attention_num_buckets, second.n_heads)
    with pytest.raises(ExportError, match=r"^T5ForConditionalGeneration .*held by the layers \[0, 1\] of the encoder;"
                                          r" the exporter restates T5's, held by the first layer alone$"):
        export("t5", tmp_path / "out", model=model, tokenizer=t5_tokenizer)
    assert not (tmp_path / "out").exists()
