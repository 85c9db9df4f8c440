"""The ONNX export of every BART-like family: MarianMT (shared and separate vocabularies), NLLB-200
(M2M100), mBART-50, mBART-25 and BART, dense and factorized, each with a real sentencepiece tokenizer
built offline. Float32 greedy and beam translations through ``translate`` equal PyTorch's
``generate()``; the int8 export passes its check; a forced target-language code steers the ONNX search
as it steers PyTorch's and is never in the output; a layout the exporter does not restate is refused
in one line."""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import FAMILIES, make_run_dir, refused_in_one_line, save_model_folder, varied_
from test_families import sentencepiece_folder
from transformers import PegasusConfig, PegasusForConditionalGeneration

from matrix_decomposition import decompose_, save_compressed_model
from mdcompress import models, translate
from mdcompress.onnx_export import ExportError, export
from mdcompress.translate import OnnxTranslator, TorchTranslator, choose_languages_, load_translator, translate_lines

BY_NAME = {f.name: f for f in FAMILIES}
# (case, family, tokenizer: None for the Marian tokenizer of conftest, else (class, codes, source, target))
CASES = {
    "marian": ("marian", None),
    "marian-separate": ("marian", None),  # the OPUS-MT "tc-big" layout: vocabularies and output projection apart
    "nllb": ("nllb-m2m100", ("NllbTokenizer", ["eng_Latn", "deu_Latn", "fra_Latn"], "eng_Latn", "deu_Latn")),
    "mbart-50": ("mbart", ("MBart50Tokenizer", None, "en_XX", "de_DE")),  # the code forced as first token
    "mbart-25": ("mbart", ("MBartTokenizer", None, "en_XX", "de_DE")),  # the code as decoder start token
    "bart": ("bart", None),
}


def ended(rows, eos: int):
    """Each row up to its first </s>: generate() pads the rows that ended first, the ONNX search does not."""
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def build(case: str, factorized: bool, folder, tiny_tokenizer, tiny_pairs):
    """The model folder of ``case`` (saved by this tool, languages set as a run sets them) and its tokenizer."""
    family, spec = CASES[case]
    tokenizer = tiny_tokenizer
    if spec is not None:
        tokenizer_class, codes, source, target = spec
        extra = {"additional_special_tokens": codes} if codes else {}
        tokenizer = sentencepiece_folder(folder / "spm", tiny_pairs, "sentencepiece.bpe.model",
                                         {"tokenizer_class": tokenizer_class, **extra})
    model = BY_NAME[family].make(tokenizer)
    if case == "marian-separate":
        config = model.config.to_dict()
        config.update(share_encoder_decoder_embeddings=False, decoder_vocab_size=len(tokenizer),
                      tie_word_embeddings=False)  # a larger target vocabulary (ids with no text): test_onnx_export
        torch.manual_seed(0)
        model = type(model)(type(model.config).from_dict(config)).eval()
    if spec is not None:  # as load_models sets them: the source's code read, the target's forced
        tokenizer.src_lang, tokenizer.tgt_lang = source, target
        models.set_languages_(model, tokenizer, source, target)
    if factorized:
        decompose_(model, ["*"], k_info=4)
    varied_(model, 0.4 if case == "marian-separate" else 0.6, norms=False)  # scales at which each says varied things
    save_compressed_model(model, folder / "model", tokenizer)
    return folder / "model", tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer, tiny_pairs):
    """``exported(case, factorized)``: (model folder, tokenizer, its float32 export), built once per module;
    the tests read them and leave them as they are."""
    made = {}

    def get(case: str, factorized: bool):
        if (case, factorized) not in made:
            folder = tmp_path_factory.mktemp(f"{case}-{'factorized' if factorized else 'dense'}")
            model, tokenizer = build(case, factorized, folder, tiny_tokenizer, tiny_pairs)
            made[case, factorized] = model, tokenizer, export(model, folder / "onnx")
        return made[case, factorized]

    return get


@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "factorized"])
@pytest.mark.parametrize("case", list(CASES))
def test_onnx_translations_equal_pytorch_greedy_and_beam(case, factorized, exported, tiny_pairs, tmp_path):
    folder, tokenizer, onnx_dir = exported(case, factorized)
    info = json.loads((onnx_dir / "onnx_export.json").read_text())
    assert info["precision"] == "float32" and info["max_abs_diff"] < 1e-4
    assert info["model_type"] == BY_NAME[CASES[case][0]].config_class.model_type  # marian, m2m_100, mbart, bart
    sources = [s for s, _ in tiny_pairs[200:212]]  # a dozen sentences
    torch_translator, onnx_translator = load_translator(folder), load_translator(onnx_dir)
    assert isinstance(torch_translator, TorchTranslator) and isinstance(onnx_translator, OnnxTranslator)
    for beams in (1, 3):
        expected = translate_lines(torch_translator, sources, batch_size=5, num_beams=beams, max_new_tokens=12)
        got = translate_lines(onnx_translator, sources, batch_size=5, num_beams=beams, max_new_tokens=12)
        assert beams > 1 or len(set(expected)) > 3  # the model says different things for different inputs
        assert got == expected, beams
    spec = CASES[case][1]
    if spec is not None:  # the export's tokenizer reads the sources as the model was compressed: their code in
        source_code = onnx_translator.tokenizer.convert_tokens_to_ids(spec[2])
        assert source_code in onnx_translator.tokenizer(sources[0])["input_ids"][:1] + \
            onnx_translator.tokenizer(sources[0])["input_ids"][-1:]  # first (NLLB, mBART-50) or last (mBART-25)
    # the token ids too (what the text leaves out: special tokens, a language code), padded rows and all
    batch = tokenizer(sources[:6], return_tensors="np", padding=True)
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    model = torch_translator.model
    code = model.generation_config.forced_bos_token_id
    for beams in (1, 3):
        rows = ended(onnx_translator.generate(ids, mask, num_beams=beams, max_new_tokens=10), tokenizer.eos_token_id)
        assert rows == ended(torch_translator.generate(ids, mask, num_beams=beams, max_new_tokens=10),
                             tokenizer.eos_token_id), beams
        raw = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             num_beams=beams, max_new_tokens=10, do_sample=False)
        start = 1 if code is None else 2  # the decoder's start token, and the forced code: no part of a translation
        assert code is None or (raw[:, 1] == code).all()
        assert rows == ended(raw[:, start:].tolist(), tokenizer.eos_token_id), beams
    if case == "marian-separate":  # the layout exported: a table for each side
        assert model.get_encoder().embed_tokens is not model.get_decoder().embed_tokens
    if not factorized:
        int8 = export(folder, tmp_path / "onnx-int8", "int8")
        info = json.loads((int8 / "onnx_export.json").read_text())
        assert info["precision"] == "int8" and info["max_abs_diff_before_int8"] < 1e-4
        ops = {n.op_type for n in onnx.load(str(int8 / "decoder.onnx"), load_external_data=False).graph.node}
        assert "MatMulInteger" in ops
        assert len(translate_lines(load_translator(int8), sources[:4], max_new_tokens=8)) == 4


@pytest.mark.parametrize("case", ["nllb", "mbart-50", "mbart-25"])
def test_a_forced_target_language_steers_onnx_as_pytorch_and_is_not_in_the_output(case, exported, tiny_pairs,
                                                                                   tmp_path, capsys):
    """--target-lang on the export: ONNX Runtime forces the other code as generate() does (its translations
    equal PyTorch's with the same flag, and differ from those into the saved language), and the code is no
    part of a translation, in the ids or the text."""
    folder, tokenizer, onnx_dir = exported(case, False)
    other = "fra_Latn" if case == "nllb" else "fr_XX"
    code = tokenizer.convert_tokens_to_ids(other)
    sources = [s for s, _ in tiny_pairs[200:212]]
    outputs = {}
    for name, model in (("torch", folder), ("onnx", onnx_dir)):
        translator = load_translator(model)
        choose_languages_(translator, None, other)
        outputs[name] = translate_lines(translator, sources, max_new_tokens=10, num_beams=2)
        batch = translator.tokenizer(sources[:4], return_tensors="np", padding=True)
        rows = translator.generate(batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64),
                                   max_new_tokens=10)
        assert rows and all(code not in row for row in rows), (name, rows)
    assert outputs["onnx"] == outputs["torch"]
    assert not any(other in line for line in outputs["onnx"])
    assert outputs["onnx"] != translate_lines(load_translator(onnx_dir), sources, max_new_tokens=10, num_beams=2)
    # the command: one line in, one line out, the same in both backends
    (tmp_path / "in.txt").write_text("\n".join(sources[:3]) + "\n")
    lines = {}
    for name, model in (("torch", folder), ("onnx", onnx_dir)):
        capsys.readouterr()
        assert translate.main(["--model", str(model), "--input", str(tmp_path / "in.txt"), "--target-lang", other,
                               "--max-new-tokens", "8"]) == 0
        lines[name] = capsys.readouterr().out
    assert lines["onnx"] == lines["torch"] and len(lines["onnx"].splitlines()) == 3


def test_onnx_target_lang_errors_are_one_line(exported, tmp_path, capsys):
    """An unknown --target-lang on an NLLB export names the codes the tokenizer has; a Marian export, which
    has no codes, says to leave the flag out."""
    (tmp_path / "in.txt").write_text("He is here.\n")
    for model, flag, words in [
        (exported("nllb", False)[2], "xx_Latn",
         ["--target-lang: 'xx_Latn' is not a language code of the model's tokenizer", "'eng_Latn'"]),
        (exported("marian", False)[2], "de", ["--target-lang: 'de' given", "has no language codes",
                                              "leave --target-lang out"])]:
        capsys.readouterr()
        assert translate.main(["--model", str(model), "--input", str(tmp_path / "in.txt"), "--target-lang", flag]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert all(word in captured.err for word in words), captured.err


def test_generation_settings_the_onnx_search_applies(tiny_tokenizer, tiny_pairs, tmp_path):
    """no_repeat_ngram_size, min_length and early_stopping from the generation config give PyTorch's tokens;
    a setting the ONNX search does not apply (repetition_penalty) is refused in one line."""
    folder, tokenizer = build("bart", False, tmp_path, tiny_tokenizer, tiny_pairs)
    settings = json.loads((folder / "generation_config.json").read_text())
    settings.update(no_repeat_ngram_size=2, min_length=4, early_stopping=True)
    (folder / "generation_config.json").write_text(json.dumps(settings))
    onnx_dir = export(folder, tmp_path / "onnx")
    sources = [s for s, _ in tiny_pairs[200:212]]
    torch_translator, onnx_translator = load_translator(folder), load_translator(onnx_dir)
    assert torch_translator.model.generation_config.no_repeat_ngram_size == 2
    for beams in (1, 3):
        expected = translate_lines(torch_translator, sources, batch_size=6, num_beams=beams, max_new_tokens=14,
                                   max_length_factor=None)
        assert translate_lines(onnx_translator, sources, batch_size=6, num_beams=beams, max_new_tokens=14,
                               max_length_factor=None) == expected, beams
    assert (onnx_translator.no_repeat, onnx_translator.min_length, onnx_translator.early_stopping) == (2, 4, True)
    model = BY_NAME["bart"].make(tiny_tokenizer)
    model.generation_config.repetition_penalty = 1.3  # refused by the export too, before it writes anything
    with pytest.raises(ExportError, match=r"generation config sets repetition_penalty 1\.3, which the ONNX translator "
                                          r"does not apply"):
        export("bart", tmp_path / "refused", model=model)
    assert not (tmp_path / "refused").exists()
    settings["repetition_penalty"] = 1.3  # set by hand in an export folder
    (onnx_dir / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(translate.TranslateError, match=r"sets repetition_penalty 1\.3 in its generation_config\.json, "
                                                       r"which the ONNX search does not apply; translate with "
                                                       r"--backend torch"):
        load_translator(onnx_dir)


# ---------------------------------------------------------------------------------------------
# Refused layouts


def pre_norm_marian(tiny_tokenizer, folder):
    """A Marian whose config says pre-norm (transformers 3's normalize_before), which MarianMTModel ignores."""
    model = BY_NAME["marian"].make(tiny_tokenizer)
    model.config.normalize_before = True
    return save_model_folder(model, tiny_tokenizer, folder)


def test_a_model_type_still_refused_and_a_pre_norm_marian_are_one_line(tiny_tokenizer, tmp_path, capsys):
    from mdcompress import onnx_export

    pegasus = PegasusForConditionalGeneration(PegasusConfig(
        vocab_size=len(tiny_tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id, decoder_start_token_id=tiny_tokenizer.pad_token_id))
    for folder, words in [
        (save_model_folder(pegasus, tiny_tokenizer, tmp_path / "pegasus"),
         ["PegasusForConditionalGeneration (model_type 'pegasus') cannot be exported: supported are the model types",
          "bart, m2m_100, marian, mbart"]),
        (pre_norm_marian(tiny_tokenizer, tmp_path / "pre-norm"),
         ["MarianMTModel (model_type 'marian') cannot be exported: its config sets normalize_before: true",
          "PyTorch runs it post-norm"])]:
        capsys.readouterr()
        assert onnx_export.main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("onnx_export.py: error: "), err
        assert all(word in err for word in words), err
        assert not (tmp_path / "out").exists()
    model = BY_NAME["marian"].make(tiny_tokenizer)
    model.config.add_final_layer_norm = True  # the other keys of transformers 3's pre-norm Marian: refused alike
    with pytest.raises(ExportError, match="its config sets add_final_layer_norm: true"):
        export("pre-norm", tmp_path / "out", model=model)
    assert not (tmp_path / "out").exists()


def test_a_config_export_of_a_refused_layout_is_refused_before_any_work(tiny_tokenizer, tiny_pairs, tmp_path,
                                                                        capsys, monkeypatch):
    """``"export": ["onnx"]`` with a teacher the exporter refuses: one line when the models load, nothing written."""
    teacher = pre_norm_marian(tiny_tokenizer, tmp_path / "teacher")
    (tmp_path / "run").mkdir()
    run_dir = make_run_dir(tmp_path / "run", teacher, tiny_pairs[:24], tiny_pairs[100:106], export=["onnx"])
    capsys.readouterr()  # saving the teacher may have drawn a progress bar (unless an earlier test quieted them)
    refused_in_one_line(run_dir, capsys, monkeypatch, ["export: MarianMTModel (model_type 'marian') cannot be exported",
                                                       "normalize_before", "leave export out"])


@pytest.mark.slow
def test_a_run_of_an_nllb_teacher_exports_its_student_and_scores_it_as_in_pytorch(tmp_path, tiny_pairs, monkeypatch):
    """``"export": ["onnx", "onnx-int8"]`` with an NLLB teacher (the target language forced): the run writes both
    exports, and the float32 export, translating as PyTorch does, scores what the PyTorch student scores."""
    from test_families import run_cli

    from mdcompress.data import write_pairs

    tokenizer = sentencepiece_folder(tmp_path / "spm", tiny_pairs, "sentencepiece.bpe.model", {
        "tokenizer_class": "NllbTokenizer", "additional_special_tokens": ["eng_Latn", "deu_Latn", "fra_Latn"]})
    teacher = save_model_folder(varied_(BY_NAME["nllb-m2m100"].make(tokenizer), 0.6, norms=False), tokenizer, tmp_path / "nllb")
    write_pairs(tmp_path / "train.csv", tiny_pairs[:24])
    write_pairs(tmp_path / "eval.csv", tiny_pairs[100:112])
    assert run_cli(tmp_path, monkeypatch, teacher_model_path=str(teacher), k_info=7, max_steps=1,
                   source_lang_code="eng_Latn", target_lang_code="deu_Latn", export=["onnx", "onnx-int8"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["student_onnx"]["chrf"] == report["student"]["chrf"]
    assert report["student_onnx"]["bleu"] == report["student"]["bleu"]
    assert report["student_onnx_int8"]["size_mb"] > 0
    deu = tokenizer.convert_tokens_to_ids("deu_Latn")
    for name in ("onnx", "onnx-int8"):
        assert load_translator(tmp_path / "out" / name).generation_config.forced_bos_token_id == deu
    sources = [s for s, _ in tiny_pairs[100:112]]
    expected = translate_lines(load_translator(tmp_path / "out"), sources, max_new_tokens=10)
    assert len(set(expected)) > 1 and translate_lines(load_translator(tmp_path / "out" / "onnx"), sources,
                                                      max_new_tokens=10) == expected
