"""Vocabulary trimming (``trim_vocabulary``, mdcompress/vocabulary.py): on tiny models of each family with
real sentencepiece tokenizers trained here (MarianMT with a shared and with separate vocabularies, NLLB's
BPE tokenizer.json and M2M100's vocab.json on the M2M100 architecture, mBART-50 and mBART-25, T5 and mT5)
the logits over the kept tokens stay what they were, the tokenizer cuts text into the same pieces under
the new ids, the ids of the configs are renumbered and the folder reloads with the Auto classes; the run
with trimming and factorization end to end, exported to ONNX; the shipped teacher's translations; the
refusals; the translate command's warning."""

import copy
import json
import shutil

import pytest
import sentencepiece as spm
import torch
from helpers import FAMILIES, LOADERS, make_run_dir, refused_in_one_line, save_model_folder
from test_families import sentencepiece_folder
from transformers import (
    AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer, MarianTokenizer,
    PreTrainedTokenizerFast,
)

import compress_model
from matrix_decomposition import save_compressed_model
from mdcompress import models, vocabulary
from mdcompress.errors import ConfigError
from mdcompress.translate import TorchTranslator, load_translator, translate_lines
from mdcompress.vocabulary import CONFIG_IDS, kept_ids, remap_rows, trim_model_, trimmed_tokenizer

BY_NAME = {f.name: f for f in FAMILIES}


# ---------------------------------------------------------------------------------------------
# A tiny model and its tokenizer per case


def separate_marian(spm_dir, tmp_path, make_tiny_marian):
    """MarianMT with a target vocabulary of its own (target_vocab.json, the pieces in another order), an
    encoder embedding of the source's rows and a decoder embedding tied to the output projection."""
    folder = tmp_path / "separate"
    shutil.copytree(spm_dir, folder)
    source = json.loads((folder / "vocab.json").read_text())
    pieces = sorted((p for p in source if p not in ("</s>", "<unk>", "<pad>")), reverse=True)
    target = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    target["<pad>"] = len(target)
    (folder / "target_vocab.json").write_text(json.dumps(target))
    spm_path = str(folder / "spm.model")
    tokenizer = MarianTokenizer(source_spm=spm_path, target_spm=spm_path, vocab=str(folder / "vocab.json"),
                                target_vocab_file=str(folder / "target_vocab.json"), separate_vocabs=True)
    assert tokenizer.pad_token_id == target["<pad>"]
    model = make_tiny_marian(share_encoder_decoder_embeddings=False, decoder_vocab_size=len(target))
    return model, tokenizer


def m2m100_tokenizer(folder, tiny_pairs):
    """An M2M100Tokenizer: vocab.json (<s>, <pad>, </s>, <unk>, the pieces) beside a sentencepiece model;
    its 100 language codes numbered after the vocabulary by the class."""
    folder.mkdir(parents=True)
    (folder / "input.txt").write_text("\n".join(s for pair in tiny_pairs for s in pair), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "input.txt"), model_prefix=str(folder / "sp"), vocab_size=300,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in map(sp.id_to_piece, range(sp.get_piece_size())):
        vocab.setdefault(piece, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return M2M100Tokenizer(str(folder / "vocab.json"), str(folder / "sp.model"), src_lang="en", tgt_lang="de")


CASES = {  # name: (family, tokenizer file, tokenizer config, source code, target code)
    "marian": ("marian", None, None, None, None),
    "marian-separate": ("marian", None, None, None, None),
    "nllb": ("nllb-m2m100", "sentencepiece.bpe.model",
             {"tokenizer_class": "NllbTokenizer", "additional_special_tokens": ["eng_Latn", "deu_Latn", "fra_Latn"]},
             "eng_Latn", "deu_Latn"),
    "m2m100": ("nllb-m2m100", None, None, "en", "de"),
    "mbart50": ("mbart", "sentencepiece.bpe.model", {"tokenizer_class": "MBart50Tokenizer"}, "en_XX", "de_DE"),
    "mbart25": ("mbart", "sentencepiece.bpe.model", {"tokenizer_class": "MBartTokenizer"}, "en_XX", "de_DE"),
    "t5": ("t5", "spiece.model", {"tokenizer_class": "T5Tokenizer"}, None, None),
    "mt5": ("mt5", "spiece.model", {"tokenizer_class": "T5Tokenizer"}, None, None),
}


@pytest.fixture
def case(request, tmp_path, tiny_pairs, tiny_tokenizer, spm_dir, make_tiny_marian):
    """(model, tokenizer, languages) of the case named by the test's parameter, languages set as a run sets them."""
    name = request.param
    family, file_name, tokenizer_config, source, target = CASES[name]
    if name == "marian":
        return BY_NAME["marian"].make(tiny_tokenizer), tiny_tokenizer, {}
    if name == "marian-separate":
        return (*separate_marian(spm_dir, tmp_path, make_tiny_marian), {})
    if name == "m2m100":
        tokenizer = m2m100_tokenizer(tmp_path / "spm", tiny_pairs)
        torch.manual_seed(0)
        config = M2M100Config(vocab_size=vocabulary.tokenizer_size(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                              **BY_NAME["nllb-m2m100"].kwargs)
        model = M2M100ForConditionalGeneration(config).eval()
    else:
        tokenizer = sentencepiece_folder(tmp_path / "spm", tiny_pairs, file_name, tokenizer_config)
        if source:
            tokenizer = AutoTokenizer.from_pretrained(tmp_path / "spm", src_lang=source, tgt_lang=target)
        model = BY_NAME[family].make(tokenizer)
    if source:
        models.set_languages_(model, tokenizer, source, target)
    return model, tokenizer, {"source_lang_code": source, "target_lang_code": target}


def logits(model, input_ids, labels, start):
    """Teacher-forced logits of a batch (decoder inputs: the labels shifted right after ``start``)."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in input_ids], batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r in input_ids], batch_first=True)
    length = min(map(len, labels))
    decoder = torch.tensor([[start] + r[:length - 1] for r in labels])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits


def config_ids(model) -> dict:
    return {(where, key): getattr(config, key, None) for where, config in
            (("config", model.config), ("generation", model.generation_config)) for key in CONFIG_IDS}


# ---------------------------------------------------------------------------------------------
# Every family: the logits, the tokenizer, the ids, the folder


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_trimming_keeps_logits_pieces_and_ids_and_the_folder_reloads(case, tiny_pairs, tmp_path):
    model, tokenizer, languages = case
    sources, targets = [s for s, _ in tiny_pairs[:40]], [t for _, t in tiny_pairs[:40]]
    source_rows, target_rows = tokenizer(sources)["input_ids"], tokenizer(text_target=targets)["input_ids"]
    trim = kept_ids(model, tokenizer, source_rows, target_rows, languages)
    new_tokenizer, trim = trimmed_tokenizer(tokenizer, trim)
    separate = trim.source != trim.target
    assert separate == (not trim.shared) == getattr(tokenizer, "separate_vocabs", False)
    # something dropped, everything the pairs and the configs use kept
    assert len(trim.source) < vocabulary.tokenizer_size(tokenizer)
    assert {i for row in source_rows for i in row} <= set(trim.source)
    assert {i for row in target_rows for i in row} <= set(trim.target)
    source_map, target_map = trim.mapping("source"), trim.mapping("target")
    start = model.config.decoder_start_token_id

    before_ids = config_ids(model)
    expected = logits(model, source_rows[:6], target_rows[:6], start)[..., trim.target]
    trimmed = copy.deepcopy(model)
    trim_model_(trimmed, trim)
    new_sources = remap_rows(source_rows, source_map, -1)
    new_targets = remap_rows(target_rows, target_map, -1)
    got = logits(trimmed, new_sources[:6], new_targets[:6], target_map[start])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    rows = model.get_output_embeddings().weight.shape[0]
    assert trimmed.get_output_embeddings().weight.shape[0] == len(trim.target) < rows
    assert trimmed.get_encoder().embed_tokens.weight.shape[0] == len(trim.source)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight) == tied

    # the ids of the configs renumbered (pad, eos, bos, decoder start, forced bos/eos)
    for (where, key), value in before_ids.items():
        now = config_ids(trimmed)[(where, key)]
        assert now == (None if value is None else target_map[value]), (where, key)
    if languages.get("target_lang_code"):
        code = vocabulary.language_code_id(tokenizer, languages["target_lang_code"])
        assert vocabulary.language_code_id(new_tokenizer, languages["target_lang_code"]) == target_map[code]

    # the tokenizer: the same pieces under the new ids, on both sides
    assert new_tokenizer(sources)["input_ids"] == new_sources
    assert new_tokenizer(text_target=targets)["input_ids"] == new_targets
    if not separate:
        assert [new_tokenizer.convert_ids_to_tokens(r) for r in new_sources] == \
            [tokenizer.convert_ids_to_tokens(r) for r in source_rows]
    assert new_tokenizer.batch_decode(new_targets, skip_special_tokens=True) == \
        tokenizer.batch_decode(target_rows, skip_special_tokens=True)

    # a piece outside the kept set: <unk> where the format looks pieces up (vocab.json), kept pieces otherwise
    text = next(s for s, _ in tiny_pairs[200:] if not set(tokenizer(s)["input_ids"]) <= set(source_map))
    ids = new_tokenizer(text)["input_ids"]
    assert all(0 <= i < len(trim.source) for i in ids)
    if getattr(tokenizer, "encoder", None) is not None:  # vocab.json: Marian, M2M100
        assert new_tokenizer.unk_token_id in ids

    # saved and reloaded by the Auto classes: the same logits, the same ids
    save_compressed_model(trimmed, tmp_path / "out", new_tokenizer)
    reloaded = LOADERS["auto-classes"](tmp_path / "out")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, new_sources[:6], new_targets[:6], target_map[start]), got)
    if languages.get("source_lang_code"):
        reloaded_tokenizer.src_lang = languages["source_lang_code"]
        reloaded_tokenizer.tgt_lang = languages["target_lang_code"]
    assert reloaded_tokenizer(sources)["input_ids"] == new_sources
    assert reloaded_tokenizer(text_target=targets)["input_ids"] == new_targets
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(trim.source)


def test_bpe_keeps_the_pieces_its_merges_build_the_kept_ones_from(tmp_path, tiny_pairs):
    """NLLB's tokenizer.json is BPE: a kept piece is built by merges from smaller ones, which must stay, or
    the trimmed tokenizer would cut the same text otherwise."""
    tokenizer = sentencepiece_folder(tmp_path / "spm", tiny_pairs, "sentencepiece.bpe.model", CASES["nllb"][2])
    tokenizer.save_pretrained(tmp_path / "saved")
    data = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert data["model"]["type"] == "BPE" and data["model"]["merges"]
    rows = tokenizer([s for s, _ in tiny_pairs[:5]])["input_ids"]
    used = {i for row in rows for i in row}
    ancestors = vocabulary.bpe_ancestors(data, used)
    assert ancestors and not ancestors & used  # pieces the text never shows, which build those it does
    trim = kept_ids(BY_NAME["nllb-m2m100"].make(tokenizer), tokenizer, rows, rows)
    new_tokenizer, trim = trimmed_tokenizer(tokenizer, trim)
    assert ancestors <= set(trim.source)
    assert new_tokenizer([s for s, _ in tiny_pairs[:5]])["input_ids"] == remap_rows(rows, trim.mapping("source"), -1)


def test_min_count_and_extra_files(tiny_tokenizer, tiny_pairs, tmp_path):
    """trim_vocabulary_min_count drops the rare tokens of the pairs (never the named ones); the lines of
    trim_vocabulary_files add theirs."""
    model = BY_NAME["marian"].make(tiny_tokenizer)
    rows = tiny_tokenizer([s for s, _ in tiny_pairs[:40]])["input_ids"]
    labels = tiny_tokenizer(text_target=[t for _, t in tiny_pairs[:40]])["input_ids"]
    every = kept_ids(model, tiny_tokenizer, rows, labels)
    frequent = kept_ids(model, tiny_tokenizer, rows, labels, min_count=3)
    counts = vocabulary.count_tokens(rows + labels)
    assert set(frequent.source) == {i for i in every.source if counts[i] >= 3} | set(every.named.values())
    assert len(frequent.source) < len(every.source)
    extra = [s for s, _ in tiny_pairs[300:320]]
    more = kept_ids(model, tiny_tokenizer, rows, labels, extra_lines=extra)
    assert set(more.source) == set(every.source) | {i for r in tiny_tokenizer(extra)["input_ids"] for i in r}


# ---------------------------------------------------------------------------------------------
# The run: trimming, factorization, recovery, export


@pytest.mark.slow  # the real command end to end, with its plan and its export: about 6 s
def test_the_run_trims_then_factorizes_and_the_export_translates_as_pytorch(make_tiny_marian, tiny_tokenizer,
                                                                           tiny_pairs, tmp_path, monkeypatch, capsys):
    teacher = make_tiny_marian()
    torch.manual_seed(1)
    with torch.no_grad():  # seeded noise: a fresh tiny model says nearly the same thing for every input
        for p in teacher.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    teacher_dir = save_model_folder(teacher, tiny_tokenizer, tmp_path / "teacher")
    run_dir = make_run_dir(tmp_path / "run", teacher_dir, tiny_pairs[:48], tiny_pairs[100:110],
                           trim_vocabulary=True, decompose_layers=["*"], k_info=4, max_steps=2, batch_size=8,
                           max_new_tokens=8, checkpoint_steps=0, num_threads=1, export=["onnx"])
    monkeypatch.chdir(run_dir)
    assert compress_model.main(["--config", "config.json", "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "vocabulary (trim_vocabulary): 300 → " in plan and not (run_dir / "out").exists()
    assert compress_model.main(["--config", "config.json"]) == 0
    out = run_dir / "out"
    report = json.loads((out / "report.json").read_text())
    counts = report["trimmed_vocabulary"]
    kept = counts["vocabulary_after"]
    assert counts["vocabulary_before"] == 300 and kept < 300 and counts["shared"] is True
    assert counts["params_after"] == report["teacher"]["params"] < counts["params_before"]
    assert f"vocabulary (trim_vocabulary): 300 → {kept} tokens" in plan
    assert report["ranks"]["model.shared"] == 4  # the embedding factorized after trimming: kept rows × rank 4
    model, tokenizer = LOADERS["auto-classes"](out), AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == kept == model.config.vocab_size
    assert model.model.shared.up.weight.shape == (kept, 4)
    assert json.loads((out / "tokenizer_config.json").read_text())["trimmed_vocabulary"]["vocabulary_after"] == kept
    sources = [s for s, _ in tiny_pairs[100:130]]
    warned = {"torch": [], "onnx": []}
    for beams in (1, 3):
        expected = translate_lines(load_translator(out), sources, num_beams=beams, max_new_tokens=8,
                                   warn=warned["torch"].append)
        assert translate_lines(load_translator(out / "onnx"), sources, num_beams=beams, max_new_tokens=8,
                               warn=warned["onnx"].append) == expected
        assert len(set(expected)) > 1
    # pairs 100–129 hold tokens outside the kept set (those of pairs 0–47 and 100–109): both backends say so
    assert len(warned["torch"]) == 2 and warned["onnx"] == warned["torch"] and "read as <unk>" in warned["onnx"][0]


def test_an_nllb_run_keeps_its_language_codes_and_forces_the_target_one(tmp_path, tiny_pairs, monkeypatch):
    """The run on a tiny NLLB teacher (BPE tokenizer.json, three language codes): the configured codes
    are kept, fra_Latn is dropped, and the saved model forces the target code under its new id."""
    tokenizer = sentencepiece_folder(tmp_path / "spm", tiny_pairs, "sentencepiece.bpe.model", CASES["nllb"][2])
    teacher_dir = save_model_folder(BY_NAME["nllb-m2m100"].make(tokenizer), tokenizer, tmp_path / "nllb")
    run_dir = make_run_dir(tmp_path / "run", teacher_dir, tiny_pairs[:24], tiny_pairs[100:106], trim_vocabulary=True,
                           source_lang_code="eng_Latn", target_lang_code="deu_Latn", decompose_layers=["*"], k_info=4,
                           max_steps=1, batch_size=8, max_new_tokens=4, checkpoint_steps=0, num_threads=1)
    monkeypatch.chdir(run_dir)
    assert compress_model.main(["--config", "config.json"]) == 0
    out = run_dir / "out"
    trimmed = AutoTokenizer.from_pretrained(out)
    deu = trimmed.convert_tokens_to_ids("deu_Latn")
    assert "eng_Latn" in trimmed.get_vocab() and "fra_Latn" not in trimmed.get_vocab()
    assert deu < len(trimmed) < len(tokenizer)
    assert json.loads((out / "generation_config.json").read_text())["forced_bos_token_id"] == deu
    assert trimmed(text_target="Er ist hier.")["input_ids"][0] == deu
    model = LOADERS["auto-classes"](out)
    generated = model.generate(**trimmed(["He is here."], return_tensors="pt"), max_new_tokens=3)
    assert generated[0, 1] == deu and model.config.vocab_size == len(trimmed)


# ---------------------------------------------------------------------------------------------
# The shipped teacher


def test_the_shipped_teacher_translates_held_out_pairs_as_before_but_where_a_dropped_token_is_involved():
    """Trimmed to the tokens of 2,000 training pairs, the shipped teacher translates 50 held-out pairs of
    eval.csv token for token as before, except where the untrimmed teacher emitted a token that is no
    longer there or the source holds one (read as <unk>); those are counted. (The whole measurement, on
    1,000 pairs with all training pairs: benchmarks/bench_vocabulary.py.)"""
    from benchmarks.bench_vocabulary import REPO, greedy_ids
    from matrix_decomposition import load_pretrained
    from mdcompress.data import read_pairs

    teacher, tokenizer = load_pretrained(str(REPO / "models" / "teacher-en-de"))
    train = read_pairs(REPO / "data" / "tatoeba_en_de" / "train.csv")[:2000]
    held_out = read_pairs(REPO / "data" / "tatoeba_en_de" / "eval.csv")[:50]
    trim = kept_ids(teacher, tokenizer, tokenizer([s for s, _ in train])["input_ids"],
                    tokenizer(text_target=[t for _, t in train])["input_ids"])
    new_tokenizer, trim = trimmed_tokenizer(tokenizer, trim)
    trimmed = copy.deepcopy(teacher)
    trim_model_(trimmed, trim)
    pad = trim.mapping("target")[tokenizer.pad_token_id]
    assert teacher.generation_config.bad_words_ids == [[tokenizer.pad_token_id]]  # OPUS-MT's: never generate <pad>
    assert trimmed.generation_config.bad_words_ids == [[pad]] and trimmed.config.decoder_start_token_id == pad
    sources = tokenizer([s for s, _ in held_out])["input_ids"]
    before = greedy_ids(teacher, tokenizer, sources)
    after = [[trim.target[i] for i in row]
             for row in greedy_ids(trimmed, new_tokenizer, new_tokenizer([s for s, _ in held_out])["input_ids"])]
    kept = set(trim.target)
    involved = [not set(row) <= kept or not set(source) <= kept for row, source in zip(before, sources)]
    changed = [a != b for a, b in zip(before, after)]
    assert not any(c and not i for c, i in zip(changed, involved))  # every change has a dropped token behind it
    assert 0 < sum(involved) < len(held_out) and sum(changed) <= sum(involved)
    assert sum(not c for c in changed) >= 25


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written


def wordlevel_teacher(folder, tiny_tokenizer, tiny_pairs):
    """A tiny MarianMT whose tokenizer is a tokenizer.json with a WordLevel model."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

    words = sorted({w for s, t in tiny_pairs for w in (s + " " + t).split()})[:200]
    vocab = {"</s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab["<pad>"] = len(vocab)
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    from transformers import MarianConfig, MarianMTModel

    model = MarianMTModel(MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=vocab["<pad>"],
                                       eos_token_id=0, decoder_start_token_id=vocab["<pad>"]))
    return save_model_folder(model, tokenizer, folder)


def unknown_start_teacher(folder, make_tiny_marian, tiny_tokenizer):
    """A tiny MarianMT whose config starts decoding with an id its tokenizer does not have."""
    model = make_tiny_marian(vocab_size=len(tiny_tokenizer) + 8, decoder_start_token_id=len(tiny_tokenizer) + 3)
    return save_model_folder(model, tiny_tokenizer, folder)


@pytest.mark.parametrize("what, words", [
    ("no-pairs", ["trim_vocabulary: no training pairs"]),
    ("files", ["trim_vocabulary_files: 'missing.txt' does not exist"]),
    ("wordlevel", ["trim_vocabulary: TokenizersBackend's tokenizer.json has a WordLevel model",
                   "cannot rewrite", "set trim_vocabulary to false"]),
    ("unknown-id", ["trim_vocabulary: the model's config decoder_start_token_id is id 303",
                    "not a token of the tokenizer", "ids 0–299"]),
    ("not-asked", ["trim_vocabulary_min_count: 2 is for trim_vocabulary, which is false"]),
    ("kd-top-k", ["kd_top_k: 290 is more than the trimmed vocabulary", "tokens kept by trim_vocabulary"]),
])
def test_refusals_are_one_line_and_write_nothing(what, words, tiny_teacher_dir, tiny_tokenizer, tiny_pairs,
                                                 make_tiny_marian, tmp_path, monkeypatch, capsys):
    teacher = {"wordlevel": lambda: wordlevel_teacher(tmp_path / "wordlevel", tiny_tokenizer, tiny_pairs),
               "unknown-id": lambda: unknown_start_teacher(tmp_path / "unknown", make_tiny_marian, tiny_tokenizer),
               }.get(what, lambda: tiny_teacher_dir)()
    keys = {"files": {"trim_vocabulary_files": ["missing.txt"]},
            "not-asked": {"trim_vocabulary": False, "trim_vocabulary_min_count": 2},
            "kd-top-k": {"kd_top_k": 290, "loss_weights": {"ce": 1, "kd": 1, "feature": 0}}}.get(what, {})
    run_dir = make_run_dir(tmp_path / "run", teacher, tiny_pairs[:24], tiny_pairs[100:106], max_steps=1, k_info=4,
                           batch_size=8, max_new_tokens=4, checkpoint_steps=0, num_threads=1,
                           **{"trim_vocabulary": True, **keys})
    if what == "no-pairs":  # a preprocessing hook that leaves every pair without tokens
        monkeypatch.setattr(compress_model, "data_preprocessor",
                            lambda batch, tokenizer, config: {"input_ids": [[] for _ in batch["source_text"]],
                                                              "attention_mask": [[] for _ in batch["source_text"]],
                                                              "labels": [[] for _ in batch["source_text"]]})
    refused_in_one_line(run_dir, capsys, monkeypatch, words)


def test_no_pairs_and_named_ids_outside_the_tokenizer_are_refused(tiny_tokenizer):
    model = BY_NAME["marian"].make(tiny_tokenizer)
    with pytest.raises(ConfigError, match="no training pairs"):
        kept_ids(model, tiny_tokenizer, [], [])
    model.generation_config.forced_bos_token_id = 5000
    with pytest.raises(ConfigError, match="generation config forced_bos_token_id is id 5000"):
        kept_ids(model, tiny_tokenizer, [[3, 0]], [[4, 0]])


# ---------------------------------------------------------------------------------------------
# The translate command


def test_translate_warns_once_with_the_count_of_unknown_pieces(tiny_tokenizer, tiny_pairs):
    model = BY_NAME["marian"].make(tiny_tokenizer)
    rows = tiny_tokenizer([s for s, _ in tiny_pairs[:30]])["input_ids"]
    labels = tiny_tokenizer(text_target=[t for _, t in tiny_pairs[:30]])["input_ids"]
    new_tokenizer, trim = trimmed_tokenizer(tiny_tokenizer, kept_ids(model, tiny_tokenizer, rows, labels))
    trim_model_(model, trim)
    translator = TorchTranslator(model, new_tokenizer)
    warnings = []
    translate_lines(translator, [s for s, _ in tiny_pairs[:30]], max_new_tokens=4, warn=warnings.append)
    assert warnings == []  # the pairs the vocabulary was taken from
    unknown = [t for t in tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
               if tiny_tokenizer.convert_tokens_to_ids(t) not in trim.mapping("source") and t.startswith("▁")
               and len(t) > 3][:2]
    lines = [f"He {unknown[0][1:]} here.", f"{unknown[1][1:]} and {unknown[0][1:]}.", "He is here."]
    count = sum(row.count(new_tokenizer.unk_token_id) for row in new_tokenizer(lines)["input_ids"])
    assert count >= 3
    translate_lines(translator, lines, max_new_tokens=4, warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith(f"{count} tokens of the input are outside"), warnings
    untrimmed = TorchTranslator(BY_NAME["marian"].make(tiny_tokenizer), tiny_tokenizer)
    translate_lines(untrimmed, ["He \u2603 here."], max_new_tokens=4, warn=warnings.append)
    assert len(warnings) == 1  # an untrimmed tokenizer's <unk> is not ours to report


@pytest.mark.slow  # a benchmark's --quick mode on the shipped teacher
def test_bench_vocabulary_quick(tmp_path, capsys):
    from helpers import benchmark_in_process

    report, out = benchmark_in_process("bench_vocabulary.py", tmp_path, capsys, "--quick")
    assert (report["train_pairs"], report["eval_pairs"]) == (2000, 50) and "translations changed" in out
    assert report["vocabulary_after"] < report["vocabulary_before"] == 8000
    assert report["changed_with_neither"] == 0  # a change always has a dropped token behind it
    assert report["changed"] <= report["untrimmed_emitted_a_dropped_token"] + report["source_had_a_dropped_token"]
    assert report["target_only_rows"] < report["union_rows"] < report["source_only_rows"] + report["target_only_rows"]
