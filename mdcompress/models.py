"""The models of a run: the teacher, the model factorized into the student (the teacher itself by
default) and the teacher's tokenizer, with the language codes of a multilingual one, and the
sequence lengths the models can represent.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from matrix_decomposition import load_pretrained
from mdcompress.config import Config, ConfigError
from mdcompress.errors import DecompositionError, ExportError
from mdcompress.onnx_export import _check_exportable


def set_languages_(model, tokenizer, source_lang_code: str | None, target_lang_code: str | None,
                   keys: tuple[str, str] = ("source_lang_code", "target_lang_code"), whose: str = "teacher") -> None:
    """Check the language codes asked for against a multilingual tokenizer (NLLB, M2M100, mBART:
    it has ``src_lang`` / ``tgt_lang``; the config's source_lang_code / target_lang_code) and make the
    target language's token the first generated one, as the references start with it
    (``generation_config.forced_bos_token_id``; for mBART-25, whose references end with it,
    ``decoder_start_token_id``), which every ``generate()`` call of the run and of the saved model then
    uses. A multilingual teacher with no target language anywhere (config, tokenizer, generation
    config) is refused: it would translate into whatever it likes. ``keys`` name the two settings in
    the messages (the translate command's ``--source-lang`` / ``--target-lang``), ``whose`` the model."""
    source_key, target_key = keys
    name = type(tokenizer).__name__
    multilingual = hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "tgt_lang")
    given = {k: v for k, v in ((source_key, source_lang_code), (target_key, target_lang_code)) if v}
    if given and not multilingual:
        key = next(iter(given))
        raise ConfigError(f"{key}: {given[key]!r} given, but the {whose}'s tokenizer ({name}) has no language codes "
                          f"(they are for NLLB/M2M100 and mBART-50 models); leave {key} out")
    if not multilingual:
        return
    target = target_lang_code or tokenizer.tgt_lang
    ids = {}
    for key, code in {**given, **({target_key: target} if target else {})}.items():  # the codes given first
        try:  # M2M100 names its codes "de" (token "__de__"), NLLB and mBART-50 by their tokens
            ids[key] = tokenizer.get_lang_id(code) if hasattr(tokenizer, "get_lang_id") else \
                tokenizer.convert_tokens_to_ids(code)
        except KeyError:
            ids[key] = None
        if ids[key] in (None, tokenizer.unk_token_id):
            codes = [t for t in tokenizer.all_special_tokens if not t.startswith("<")]  # not <pad>, </s>…
            raise ConfigError(f"{key}: {code!r} is not a language code of the {whose}'s tokenizer ({name}); "
                              f"its codes look like {', '.join(map(repr, codes[:3])) or 'nothing'}")
    if not target:
        if model.generation_config.forced_bos_token_id is None:
            raise ConfigError(f"{target_key}: the {whose}'s tokenizer ({name}) is multilingual and nothing says which "
                              f"language to translate into; set {target_key} (e.g. \"deu_Latn\" for NLLB)")
        return
    if tokenizer(text_target="a")["input_ids"][0] == ids[target_key]:  # NLLB, M2M100, mBART-50
        model.generation_config.forced_bos_token_id = ids[target_key]
    else:  # mBART-25 puts the code last; the model's shift of the labels moves it first: decoding starts with it
        model.generation_config.decoder_start_token_id = ids[target_key]


def load_models(config: Config) -> tuple:
    """(teacher, the model factorized into the student, the teacher's tokenizer): the model is
    ``student_model_path``, or the teacher itself by default. A multilingual tokenizer gets the
    language codes, and the target language is forced when generating (``set_languages_``). An
    export the teacher cannot have, or a kd_top_k above its vocabulary, is refused now, not after the
    training."""
    languages = {k: v for k, v in (("src_lang", config.source_lang_code), ("tgt_lang", config.target_lang_code)) if v}
    teacher, tokenizer = load_pretrained(config.teacher_model_path, "teacher_model_path", languages)
    set_languages_(teacher, tokenizer, config.source_lang_code, config.target_lang_code)
    if config.export:  # a model the ONNX exporter cannot restate is refused before any work
        try:
            _check_exportable(teacher)
        except ExportError as e:
            raise ConfigError(f"export: {e}; leave export out") from None
    vocab = teacher.get_output_embeddings().out_features
    if config.kd_top_k > vocab:
        raise ConfigError(f"kd_top_k: {config.kd_top_k} is more than the teacher's vocabulary ({vocab} tokens)")
    base = teacher
    if config.student_model_path:
        base, base_tokenizer = load_pretrained(config.student_model_path, "student_model_path", languages)
        set_languages_(base, base_tokenizer, config.source_lang_code, config.target_lang_code)
        check_same_vocabulary(teacher, tokenizer, base, base_tokenizer)
    return teacher, base, tokenizer


def fit_lengths(config: Config, *models) -> Config:
    """``config`` with max_source_length, max_target_length and max_new_tokens cut to the positions
    the ``models`` can represent: longer sequences are truncated, not crashed on."""
    positions = min((getattr(m.config, "max_position_embeddings", None) or 10**9) for m in models)
    if positions >= 10**9:
        return config
    return dataclasses.replace(config, max_source_length=min(config.max_source_length, positions),
                               max_target_length=min(config.max_target_length, positions),
                               max_new_tokens=min(config.max_new_tokens, positions - 1))


def check_same_vocabulary(teacher: nn.Module, teacher_tokenizer, student: nn.Module, student_tokenizer) -> None:
    """Refuse a separate student whose vocabulary is not the teacher's: its output distribution would
    not be over the same tokens, and the teacher's tokenizer prepares the data for both."""
    sizes = student.config.vocab_size, teacher.config.vocab_size
    if sizes[0] != sizes[1]:
        raise DecompositionError(f"student_model_path: the student's vocabulary has {sizes[0]:,} tokens and the "
                                 f"teacher's {sizes[1]:,}; the student must share the teacher's vocabulary")
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise DecompositionError(f"student_model_path: the student's vocabulary has the teacher's size ({sizes[0]:,} "
                                 f"tokens) but other tokens; the student must share the teacher's vocabulary")
