"""Beyond MarianMT: the same surgery, distillation, save and reload on tiny random models of each
family (NLLB-200/M2M100, mBART, BART, T5, mT5 with an untied head), driven by one table; forced
target-language tokens, T5's task prefix, and the architectures that are refused."""

import json
import re
import shutil

import pytest
import sentencepiece as spm
import torch
from helpers import FAMILIES, LOADERS, distillation_settings, save_model_folder, tokenized_pairs
from torch import nn
from transformers import AutoTokenizer, BertConfig, EncoderDecoderConfig, EncoderDecoderModel, GPT2Config, GPT2LMHeadModel

import compress_model
import decomposition
from mdcompress import models
import matrix_decomposition
from distillation.knowledge_distillation import LOSS_TERMS
from distillation.sequence_level_kd import teacher_translations
from matrix_decomposition import (
    DecompositionError, LowRankEmbedding, LowRankLinear, check_supported, count_parameters, decompose_,
    default_targets, init_notes, load_pretrained, max_saving_rank, save_compressed_model,
)
from mdcompress.calibration import calibration_batches, fisher_weighted, gather_fisher_rows, gather_input_grams
from mdcompress.rank_allocation import ranks_for_ratio, sensitivity_errors
from mdcompress.teacher_forcing import decoder_inputs, source_positioned
from mdcompress.translate import translate

RANK = 4
CASES = [pytest.param(f, id=f.name) for f in FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}


@pytest.fixture(scope="module")
def train_set(tiny_pairs, tiny_tokenizer):
    return tokenized_pairs(tiny_pairs, tiny_tokenizer, 32, max_source_length=12, max_target_length=12)


@pytest.fixture(scope="module")
def batches(train_set, tiny_tokenizer):
    return calibration_batches(train_set, tiny_tokenizer, 16, 8)


# ---------------------------------------------------------------------------------------------
# Which layers


@pytest.mark.parametrize("family", CASES)
def test_default_targets_are_every_linear_of_the_layers(family, tiny_tokenizer):
    model = family.make(tiny_tokenizer)
    targets = default_targets(model)
    expected = [name for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name.startswith(family.layers)]
    assert targets == expected and len(targets) == 2 * family.linears[0] + 2 * family.linears[1]
    assert not any("relative_attention_bias" in name or "lm_head" in name for name in targets)


@pytest.mark.parametrize("family", CASES)
def test_source_positioned_are_the_encoder_and_the_cross_attention_keys_values(family, tiny_tokenizer):
    model = family.make(tiny_tokenizer)
    targets = default_targets(model)
    expected = {n for n in targets if n.startswith(family.layers[0]) or n.endswith(family.cross_kv)}
    assert source_positioned(model, targets) == expected and len(expected) == 2 * family.linears[0] + 4


@pytest.mark.parametrize("family", CASES)
def test_star_factorizes_the_token_embedding_the_head_and_leaves_t5s_relative_bias(family, tiny_tokenizer):
    model = family.make(tiny_tokenizer)
    before = count_parameters(model)
    relative = {n: m.weight.detach().clone() for n, m in model.named_modules() if "relative_attention_bias" in n}
    shapes = {n: model.get_submodule(n).weight.shape for n in default_targets(model) + [family.embedding, "lm_head"]}
    ranks = decompose_(model, ["*"], RANK)
    head = [] if family.tied_head else ["lm_head"]
    assert list(ranks) == [family.embedding, *default_targets(model), *head]
    embedding = model.get_submodule(family.embedding)
    assert isinstance(embedding, LowRankEmbedding) and model.get_input_embeddings() is embedding
    assert isinstance(model.lm_head, LowRankLinear)
    assert (model.lm_head.up.weight is embedding.up.weight) is family.tied_head
    for name, weight in relative.items():  # T5: untouched, still an embedding with the same table
        assert type(model.get_submodule(name)) is nn.Embedding and torch.equal(model.get_submodule(name).weight, weight)
    # r·(n+d) per layer instead of n·d; biases (none in T5) and everything else unchanged
    saved = sum(n * d - RANK * (n + d) for name, (n, d) in shapes.items() if name in ranks)
    assert count_parameters(model) == before - saved
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), decoder_input_ids=torch.tensor([[5, 6]]))


@pytest.mark.parametrize("family, key, words", [
    (BY_NAME["t5"], "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "(shared.weight)"),
    (BY_NAME["bart"], "model.decoder.embed_positions.weight", "(model.shared.weight)"),
], ids=["t5-relative-bias", "bart-positions"])
def test_other_embeddings_are_refused_with_a_pointer(family, key, words, tiny_tokenizer):
    pointer = r"not an nn\.Linear.*only the token embedding can be " + re.escape(words)
    with pytest.raises(DecompositionError, match=pointer):
        decompose_(family.make(tiny_tokenizer), [key], RANK)


@pytest.mark.parametrize("family", CASES)
def test_full_rank_embedding_reproduces_the_scaled_one(family, tiny_tokenizer):
    original = family.make(tiny_tokenizer).get_input_embeddings()  # ×√d in NLLB and mBART, ×1 in BART
    low = LowRankEmbedding.from_embedding(original, original.embedding_dim, svd="exact")
    ids = torch.tensor([[3, 4, 5, tiny_tokenizer.pad_token_id]])
    torch.testing.assert_close(low(ids), original(ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Activation init, sensitivity allocation, distillation, save → reload


@pytest.mark.parametrize("family", CASES)
def test_activation_init_and_sensitivity_allocation(family, tiny_tokenizer, batches):
    teacher = family.make(tiny_tokenizer)
    linears = default_targets(teacher)
    grams = gather_input_grams(teacher, linears, batches)
    assert set(grams) == set(linears) and all(g.abs().sum() > 0 for g in grams.values())
    student, _ = decomposition.build_student(teacher, ["*"], RANK, input_grams=grams)
    assert set(init_notes(student)) == {family.embedding} | ({"lm_head"} if not family.tied_head else set())
    everything = list(matrix_decomposition.resolve_ranks(teacher, ["*"], 1))  # the embedding (and an untied head) too
    grams = gather_input_grams(teacher, everything, batches)
    weighting = grams[family.embedding]
    assert isinstance(weighting, matrix_decomposition.Weighting) and (weighting.gram is not None) == family.tied_head
    assert weighting.rows.min() > 0 and (weighting.rows > weighting.rows.min()).any()  # tokens counted
    student, _ = decomposition.build_student(teacher, ["*"], RANK, input_grams=grams)
    assert init_notes(student) == {}
    names = [family.embedding, linears[0], linears[-1]]
    errors = sensitivity_errors(teacher, names, batches, points=2)
    assert all(errors[n][1] >= errors[n][-1] >= 0 for n in names)
    shapes = [teacher.get_submodule(n).weight.shape for n in names]
    total = count_parameters(teacher)
    kept = total - sum(n * d for n, d in shapes)
    middle = kept + sum(max_saving_rank(n, d) * (n + d) for n, d in shapes) // 2
    ratio = round(middle / total, 3)
    ranks = ranks_for_ratio(teacher, names, ratio, errors=errors)
    allocated, _ = decomposition.build_student(teacher, names, ranks)
    assert count_parameters(allocated) <= ratio * total


@pytest.mark.parametrize("family", CASES)
def test_fisher_init(family, tiny_tokenizer, batches):
    """init "fisher" on every family: a gradient reaches every linear of the layers, and the weighted
    factorization builds without falling back."""
    teacher = family.make(tiny_tokenizer)
    linears = default_targets(teacher)
    flags = [p.requires_grad for p in teacher.parameters()]
    fisher = gather_fisher_rows(teacher, linears, batches)
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert set(fisher) == set(linears) and all(torch.isfinite(f).all() and f.sum() > 0 for f in fisher.values())
    weighted = fisher_weighted(gather_input_grams(teacher, linears, batches), fisher)
    assert all(isinstance(weighted[n], matrix_decomposition.Weighting) for n in linears)
    student, _ = decomposition.build_student(teacher, linears, RANK, input_grams=weighted)
    assert init_notes(student) == {}


@pytest.mark.parametrize("family", CASES)
def test_distill_save_and_reload_identical(family, tiny_tokenizer, train_set, batches, tmp_path):
    teacher = family.make(tiny_tokenizer)
    student, ranks = decomposition.build_student(teacher, ["*"], RANK)
    settings = distillation_settings(max_steps=2, batch_size=8, loss_weights=dict.fromkeys(LOSS_TERMS, 1.0))
    features = decomposition.resolve_feature_layers(teacher, [], ranks)
    distiller = decomposition.distill(teacher, student, tiny_tokenizer, train_set, None, settings, features)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in distiller.history[-1].items() if k in LOSS_TERMS)
    assert set(distiller.history[-1]) >= set(LOSS_TERMS)
    student = distiller.unwrapped_student.eval()
    save_compressed_model(student, tmp_path / "out", tiny_tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == f"{teacher.config.model_type}_low_rank"
    batch = {k: batches[0][k][:3] for k in ("input_ids", "attention_mask")}  # padded: rows of different lengths
    decoder_input_ids = torch.tensor([[teacher.config.decoder_start_token_id, 5, 6]] * 3)
    with torch.no_grad():
        expected = student(**batch, decoder_input_ids=decoder_input_ids).logits
        generated = student.generate(**batch, max_new_tokens=5, do_sample=False)
    for loader in ("load_compressed_model", "auto-classes"):
        loaded = LOADERS[loader](tmp_path / "out")
        loaded.set_attn_implementation(student.config._attn_implementation)  # eager for the attention loss
        with torch.no_grad():
            assert torch.equal(loaded(**batch, decoder_input_ids=decoder_input_ids).logits, expected), loader
            assert torch.equal(loaded.generate(**batch, max_new_tokens=5, do_sample=False), generated), loader


def test_forced_bos_is_carried_into_evaluation_sequence_level_kd_and_the_saved_model(tiny_tokenizer, tmp_path):
    """The target-language token forced by the generation config (here a plain word, "Mary") steers every
    translation: BLEU's, the teacher's for sequence-level KD, and the reloaded student's, each of which is
    what generate() writes after it (the code itself is no part of a translation)."""
    teacher = BY_NAME["nllb-m2m100"].make(tiny_tokenizer)
    mary = tiny_tokenizer.convert_tokens_to_ids("▁Mary")
    assert tiny_tokenizer.decode([mary]) == "Mary"
    teacher.generation_config.forced_bos_token_id = mary
    sources = ["The train arrived.", "He is here."]
    kwargs = dict(max_new_tokens=4, batch_size=2)

    def after_the_code(model, translations):  # each what generate() wrote after the start and the forced code
        out = model.generate(**tiny_tokenizer(sources, return_tensors="pt", padding=True), max_new_tokens=4)
        assert (out[:, 1] == mary).all()
        expected = tiny_tokenizer.batch_decode(out[:, 2:], skip_special_tokens=True)
        # the same tokens, the last of the 4 new ones </s> in ours (the length bound ends each with it)
        return all(t and not t.startswith("Mary") and e.startswith(t) for t, e in zip(translations, expected))

    assert after_the_code(teacher, translate(teacher, tiny_tokenizer, sources, **kwargs))
    targets, _, _ = teacher_translations(teacher, tiny_tokenizer, sources, tmp_path / "cache", "t", **kwargs)
    assert after_the_code(teacher, targets)
    student, _ = decomposition.build_student(teacher, [], RANK)
    save_compressed_model(student, tmp_path / "out", tiny_tokenizer)
    loaded = LOADERS["load_compressed_model"](tmp_path / "out")
    assert loaded.generation_config.forced_bos_token_id == mary
    assert after_the_code(loaded, translate(loaded, tiny_tokenizer, sources, **kwargs))


# ---------------------------------------------------------------------------------------------
# The CLI with real multilingual tokenizers: NLLB's language codes, T5's task prefix


def sentencepiece_folder(folder, tiny_pairs, file_name, tokenizer_config):
    """A tokenizer folder: a unigram sentencepiece model trained on the pairs, saved as ``file_name``."""
    folder.mkdir(parents=True)
    (folder / "input.txt").write_text("\n".join(s for pair in tiny_pairs for s in pair), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "input.txt"), model_prefix=str(folder / "sp"), vocab_size=300,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2, num_threads=1)
    shutil.move(folder / "sp.model", folder / file_name)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def nllb_teacher(tmp_path, tiny_pairs):
    """A tiny NLLB teacher (M2M100 architecture) with an NLLB tokenizer knowing three language codes."""
    tokenizer = sentencepiece_folder(tmp_path / "spm", tiny_pairs, "sentencepiece.bpe.model", {
        "tokenizer_class": "NllbTokenizer", "additional_special_tokens": ["eng_Latn", "deu_Latn", "fra_Latn"]})
    return save_model_folder(BY_NAME["nllb-m2m100"].make(tokenizer), tokenizer, tmp_path / "nllb")


def run_cli(run_dir, monkeypatch, **config):
    monkeypatch.chdir(run_dir)
    (run_dir / "config.json").write_text(json.dumps({
        "dataset_path": "train.csv", "eval_dataset_path": "eval.csv", "output_path": "out", "progress": False,
        "max_steps": 2, "batch_size": 8, "max_new_tokens": 8, "checkpoint_steps": 0, "num_threads": 1, **config}))
    return compress_model.main(["--config", "config.json"])


@pytest.fixture
def run_dir(tmp_path, tiny_pairs):
    from mdcompress.data import write_pairs

    write_pairs(tmp_path / "train.csv", tiny_pairs[:24])
    write_pairs(tmp_path / "eval.csv", tiny_pairs[100:106])
    return tmp_path


def test_nllb_target_language_is_forced_in_the_run_and_the_saved_model(nllb_teacher, run_dir, monkeypatch):
    assert run_cli(run_dir, monkeypatch, teacher_model_path=str(nllb_teacher), decompose_layers=["*"], k_info=RANK,
                   source_lang_code="eng_Latn", target_lang_code="deu_Latn", sequence_level_kd=True) == 0
    out = run_dir / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    deu = tokenizer.convert_tokens_to_ids("deu_Latn")
    assert json.loads((out / "generation_config.json").read_text())["forced_bos_token_id"] == deu
    assert tokenizer.src_lang == "eng_Latn" and tokenizer.tgt_lang == "deu_Latn"
    assert tokenizer(text_target="Hallo")["input_ids"][0] == deu  # the references start with it too
    model = LOADERS["auto-classes"](out)
    generated = model.generate(**tokenizer(["He is here.", "The train arrived."], return_tensors="pt", padding=True))
    assert (generated[:, 0] == model.config.decoder_start_token_id).all() and (generated[:, 1] == deu).all()
    assert json.loads((out / "report.json").read_text())["sequence_level_kd"] is True


@pytest.mark.parametrize("tokenizer_class, source, target, first", [
    ("NllbTokenizer", "eng_Latn", "deu_Latn", "forced_bos_token_id"),  # references: code, text, </s>
    ("MBart50Tokenizer", "en_XX", "de_DE", "forced_bos_token_id"),
    ("MBartTokenizer", "en_XX", "de_DE", "decoder_start_token_id"),  # mBART-25: text, </s>, code
])
def test_decoding_starts_as_the_references_do(tokenizer_class, source, target, first, tmp_path, tiny_pairs):
    """A teacher loaded with language codes (``set_languages_``): generation starts with what the
    decoder is trained to see first (the labels shifted right), the target language's code."""
    codes = {"additional_special_tokens": ["eng_Latn", "deu_Latn"]} if tokenizer_class == "NllbTokenizer" else {}
    tokenizer = sentencepiece_folder(tmp_path / "spm", tiny_pairs, "sentencepiece.bpe.model",
                                     {"tokenizer_class": tokenizer_class, **codes})
    family = BY_NAME["nllb-m2m100"] if tokenizer_class == "NllbTokenizer" else BY_NAME["mbart"]
    folder = save_model_folder(family.make(tokenizer), tokenizer, tmp_path / "teacher")
    teacher, tokenizer = load_pretrained(str(folder), "teacher_model_path", {"src_lang": source, "tgt_lang": target})
    models.set_languages_(teacher, tokenizer, source, target)
    code = tokenizer.convert_tokens_to_ids(target)
    assert code != tokenizer.unk_token_id and getattr(teacher.generation_config, first) == code
    labels = torch.tensor(tokenizer(text_target=["Er ist hier."])["input_ids"])
    generated = teacher.generate(**tokenizer(["He is here."], return_tensors="pt"), max_new_tokens=3)
    n = 2 if first == "forced_bos_token_id" else 1  # (decoder start, code) or (code)
    assert decoder_inputs(teacher, labels)[0, :n].tolist() == generated[0, :n].tolist() and code in generated[0, :n]


@pytest.mark.parametrize("teacher, changes, words", [
    ("nllb", {"target_lang_code": "xxx_Latn"}, ["target_lang_code", "'xxx_Latn' is not a language code", "'eng_Latn'"]),
    ("nllb", {"source_lang_code": "deu_Latn"}, ["target_lang_code", "multilingual", "set target_lang_code"]),
    ("marian", {"target_lang_code": "deu_Latn"}, ["target_lang_code", "MarianTokenizer", "has no language codes"]),
])
def test_bad_family_configs_are_one_line_errors(teacher, changes, words, nllb_teacher, tiny_teacher_dir, run_dir,
                                                monkeypatch, capsys):
    folder = nllb_teacher if teacher == "nllb" else tiny_teacher_dir
    assert run_cli(run_dir, monkeypatch, teacher_model_path=str(folder), **changes) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(word in err for word in words), err
    assert not (run_dir / "out").exists()


def test_t5_task_prefix_by_the_preprocessing_hook(tmp_path, tiny_pairs, run_dir, monkeypatch):
    """mT5 (untied head, no biases, decoder_start_token_id = pad) with a sentencepiece T5 tokenizer and
    the task prefix added by ``data_preprocessor``, for training and evaluation alike."""
    tokenizer = sentencepiece_folder(tmp_path / "spm", tiny_pairs, "spiece.model", {"tokenizer_class": "T5Tokenizer"})
    teacher = save_model_folder(BY_NAME["mt5"].make(tokenizer), tokenizer, tmp_path / "teacher")
    seen = []

    def with_prefix(batch, tokenizer, config):
        sources = ["translate English to German: " + s for s in batch["source_text"]]
        seen.extend(sources)
        return compress_model.default_data_preprocessor({**batch, "source_text": sources}, tokenizer, config)

    monkeypatch.setattr(compress_model, "data_preprocessor", with_prefix)
    assert run_cli(run_dir, monkeypatch, teacher_model_path=str(teacher), decompose_layers=["*"], k_info=RANK) == 0
    assert len(seen) == 24 + 6  # every training and evaluation source
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert "lm_head" in report["ranks"] and "shared" in report["ranks"]
    model = LOADERS["auto-classes"](run_dir / "out")
    generated = model.generate(**tokenizer(seen[:2], return_tensors="pt", padding=True), max_new_tokens=4)
    assert (generated[:, 0] == tokenizer.pad_token_id).all()  # T5 starts decoding from its pad token


# ---------------------------------------------------------------------------------------------
# Refused architectures


def test_a_decoder_only_teacher_is_refused_in_one_line(tmp_path, tiny_tokenizer, run_dir, monkeypatch, capsys):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32))
    folder = save_model_folder(gpt2, tiny_tokenizer, tmp_path / "gpt2")
    assert run_cli(run_dir, monkeypatch, teacher_model_path=str(folder)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gpt2 model, not an encoder-decoder; supported:" in err, err
    assert "T5" in err and "NLLB" in err and not (run_dir / "out").exists()


def test_conv1d_layers_are_refused_in_one_line(tiny_tokenizer):
    """An encoder-decoder whose decoder is GPT-2 (Conv1D projections, weights stored transposed)."""
    encoder = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)
    decoder = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    for surgery in (check_supported, default_targets, lambda m: decompose_(m, [], RANK)):
        with pytest.raises(DecompositionError, match=r"decoder\.transformer\.h\.0\.attn\.c_attn is a Conv1D layer "
                                                     r"\(GPT-2 style\), not an nn\.Linear; supported: .*T5"):
            surgery(model)


def test_the_forced_language_code_is_not_part_of_a_translation(nllb_teacher):
    """NLLB/M2M100 generate </s>, then the forced target-language code, then the translation: the
    translate command and the run's BLEU see the translation alone, whether or not the tokenizer counts
    the code as a special token (M2M100's "__de__" showed up at the start of every line)."""
    import numpy as np

    from mdcompress.translate import TorchTranslator

    model, tokenizer = LOADERS["auto-classes"](nllb_teacher), AutoTokenizer.from_pretrained(nllb_teacher)
    deu = tokenizer.convert_tokens_to_ids("deu_Latn")
    model.generation_config.forced_bos_token_id = deu
    batch = tokenizer(["He is here.", "The train arrived."], return_tensors="np", padding=True)
    rows = TorchTranslator(model, tokenizer).generate(batch["input_ids"].astype(np.int64),
                                                      batch["attention_mask"].astype(np.int64), max_new_tokens=6)
    assert len(rows) == 2 and all(row[:1] != [deu] for row in rows)
    one = tokenizer(["He is here."], return_tensors="np")
    [row] = TorchTranslator(model, tokenizer).generate(one["input_ids"].astype(np.int64),
                                                       one["attention_mask"].astype(np.int64), max_new_tokens=6)
    raw = model.generate(**tokenizer(["He is here."], return_tensors="pt"), max_new_tokens=6)[0].tolist()
    assert raw[1] == deu and row == raw[2:]  # the same tokens, less the start and the code


def test_translate_chooses_the_languages_of_a_multilingual_model(nllb_teacher, tiny_teacher_dir, tmp_path, capsys):
    """--target-lang forces another target language; left out, the one the model was saved with stays;
    --source-lang sets how the input is read. A code the tokenizer does not know, or a model without
    codes (Marian, in PyTorch or ONNX), is refused in one line."""
    from mdcompress import translate

    tokenizer = AutoTokenizer.from_pretrained(nllb_teacher)
    deu, fra = tokenizer.convert_tokens_to_ids("deu_Latn"), tokenizer.convert_tokens_to_ids("fra_Latn")
    translator = translate.load_translator(nllb_teacher)
    translator.model.generation_config.forced_bos_token_id = deu  # as a run with target_lang_code saves it
    translate.choose_languages_(translator, "fra_Latn", None)
    assert translator.tokenizer.src_lang == "fra_Latn" and translator.model.generation_config.forced_bos_token_id == deu
    assert translator.tokenizer("Bonjour.")["input_ids"][0] == fra  # NLLB reads the source's code first
    translate.choose_languages_(translator, None, "fra_Latn")
    assert translator.model.generation_config.forced_bos_token_id == fra

    (tmp_path / "in.txt").write_text("He is here.\n")
    capsys.readouterr()  # the loading bar of the direct calls above
    for model, flags, words in [
        (nllb_teacher, ["--target-lang", "xx_Latn"], ["--target-lang: 'xx_Latn' is not a language code of the model's "
                                                     "tokenizer", "'eng_Latn'"]),
        (nllb_teacher, ["--source-lang", "english"], ["--source-lang: 'english' is not a language code"]),
        (tiny_teacher_dir, ["--target-lang", "de"], ["--target-lang: 'de' given, but the model's tokenizer "
                                                     "(MarianTokenizer) has no language codes"])]:
        assert translate.main(["--model", str(model), "--input", str(tmp_path / "in.txt"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(word in err for word in words), err
