"""Vocabulary trimming (``trim_vocabulary``): keep only the tokens a language pair uses.

A multilingual model spends much of itself on a vocabulary one language pair never touches
(NLLB-600M's embedding is 43% of its parameters, and the output projection runs over all 256,206
tokens at every decoded step). A run with ``trim_vocabulary`` keeps

- the tokenizer's named special tokens (bos, eos, unk, pad, sep, cls, mask) and every id the model's
  config and generation config name (pad, eos, bos, decoder start, forced bos/eos);
- the language codes of the configured languages (``source_lang_code``, ``target_lang_code``, or the
  tokenizer's own ``src_lang`` / ``tgt_lang``);
- every token of the model inputs of the training and evaluation pairs (the preprocessing hook's
  ``input_ids`` for the source side, ``labels`` for the target side) and of the lines of
  ``trim_vocabulary_files``, seen at least ``trim_vocabulary_min_count`` times;
- the tokens the tokenizer's class defines on its own whatever its files say (mBART's and M2M100's
  language codes): found by loading the trimmed tokenizer, and kept too.

A tokenizer with one vocabulary for both sides keeps the union of the source and target tokens, so
that the tied embedding and output projection stay one table (an id the decoder generates is fed back
to it as an input). MarianMT's separate vocabularies are trimmed each to its side.

The kept ids keep their order (new id = rank among the kept ids), except in separate vocabularies,
where the named special tokens come first on both sides so that pad and eos have one id. The rows
of the token embeddings, the output projection and ``final_logits_bias`` are selected, the ids in
the model config and generation config renumbered, and the tokenizer rewritten in its own format and
loaded back with its own class (``AutoTokenizer``): a MarianTokenizer's ``vocab.json`` (and
``target_vocab.json``) beside the unchanged sentencepiece models, a ``tokenizer.json`` with a Unigram
or BPE model (NLLB, mBART, T5 in transformers 5) with its pieces, added tokens and post-processor
renumbered. A piece outside the kept set becomes ``<unk>`` (Marian, M2M100), or, in a Unigram or BPE
``tokenizer.json``, is split into kept pieces where it can be, ``<unk>`` where not. Text made of
kept pieces is cut into the same pieces as before (a BPE vocabulary keeps the pieces its merges
build the kept ones from). ``trimmed_vocabulary`` in ``tokenizer_config.json`` records the sizes, and
``warn_unknown`` counts the ``<unk>`` ids of an input for the translate command.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mdcompress.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a model is trimmed: the translate command's ONNX backend runs without it
    from torch import nn

MARKER = "trimmed_vocabulary"  # the key in tokenizer_config.json of a trimmed tokenizer
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
CONFIG_IDS = ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id",
              "forced_eos_token_id", "sep_token_id")


@dataclass
class Trim:
    """Which ids a trimmed model keeps: ``source`` (the encoder's embedding) and ``target`` (the
    decoder's embedding, the output projection, ``final_logits_bias``), each the old ids in new-id
    order (the new id is the position); one list for a shared vocabulary. ``before``: the sizes of
    the two vocabularies before."""

    source: list[int]
    target: list[int]
    before: tuple[int, int]
    named: dict[str, int] = field(default_factory=dict)  # {what names it: old id}, for the messages
    shared: bool = True

    def mapping(self, side: str) -> dict[int, int]:
        """{old id: new id} of one side ("source" or "target")."""
        return {old: new for new, old in enumerate(self.source if side == "source" else self.target)}

    def summary(self) -> dict:
        sizes = {"vocabulary_before": self.before[0], "vocabulary_after": len(self.source)}
        if not self.shared:
            sizes.update(target_vocabulary_before=self.before[1], target_vocabulary_after=len(self.target))
        return sizes


# ---------------------------------------------------------------------------------------------
# The kept set


def language_code_id(tokenizer, code: str) -> int | None:
    """The id of a language code as the tokenizer names it (M2M100: "de" for "__de__"; NLLB, mBART: the token)."""
    try:
        found = (tokenizer.get_lang_id(code) if hasattr(tokenizer, "get_lang_id")
                 else tokenizer.convert_tokens_to_ids(code))
    except KeyError:
        return None
    return None if found in (None, tokenizer.unk_token_id) else found


def named_ids(model: nn.Module, tokenizer, language_codes: Mapping[str, str | None] = ()) -> dict[str, int]:
    """{what names it: id}: the tokenizer's named special tokens, the ids of the model config and
    generation config, and the language codes (``language_codes``: {config key: code}, with the
    tokenizer's own ``src_lang`` / ``tgt_lang`` when not given). A code the tokenizer does not know is
    an error."""
    found: dict[str, int] = {}
    for attribute in SPECIAL_ATTRIBUTES:
        if getattr(tokenizer, attribute, None) is not None:
            found[f"the tokenizer's {attribute}"] = tokenizer.convert_tokens_to_ids(str(getattr(tokenizer, attribute)))
    for where, config in (("config", model.config), ("generation config", getattr(model, "generation_config", None))):
        for key in CONFIG_IDS:
            value = getattr(config, key, None) if config is not None else None
            for i, one in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                if one is not None:
                    found[f"the model's {where} {key}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")] = one
    codes = dict(language_codes)
    for key, attribute in (("source_lang_code", "src_lang"), ("target_lang_code", "tgt_lang")):
        code = codes.get(key) or getattr(tokenizer, attribute, None)
        if code:
            code_id = language_code_id(tokenizer, code)
            if code_id is None:
                raise ConfigError(f"trim_vocabulary: {key} {code!r} is not a token of the tokenizer "
                                  f"({type(tokenizer).__name__}); give a language code it has")
            found[f"{key} {code!r}"] = code_id
    return found


def count_tokens(rows: Iterable[Sequence[int]], counts: Counter | None = None) -> Counter:
    """How often each id occurs in ``rows`` (lists of ids; -100, the ignored label, left out)."""
    counts = Counter() if counts is None else counts
    for row in rows:
        counts.update(i for i in row if i >= 0)
    return counts


def text_file_lines(paths: Sequence[str]) -> list[str]:
    """The non-empty lines of ``trim_vocabulary_files`` (UTF-8 text, one sentence a line)."""
    lines = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"trim_vocabulary_files: {path!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"trim_vocabulary_files: {path!r} cannot be read as UTF-8 text ({e})") from None
        lines += [line for line in text.splitlines() if line.strip()]
    return lines


def kept_ids(model: nn.Module, tokenizer, source_rows, target_rows, language_codes: Mapping[str, str | None] = (),
             extra_lines: Sequence[str] = (), min_count: int = 1) -> Trim:
    """The ``Trim`` of ``model`` and its ``tokenizer`` for the model inputs ``source_rows``
    (``input_ids`` of the pairs) and ``target_rows`` (their ``labels``): the named ids
    (``named_ids``), the tokens of the pairs and of ``extra_lines`` (both sides) seen at least
    ``min_count`` times (on both sides together; separate vocabularies on each side). No pairs, or a
    named id the tokenizer does not have, are errors."""
    source_counts, target_counts = count_tokens(source_rows), count_tokens(target_rows)
    if not source_counts or not target_counts:
        raise ConfigError("trim_vocabulary: no training pairs to take the vocabulary from (the training and "
                          "evaluation pairs hold no tokens); give dataset_path pairs, or set trim_vocabulary to false")
    if extra_lines:
        count_tokens(tokenizer(list(extra_lines))["input_ids"], source_counts)
        count_tokens(tokenizer(text_target=list(extra_lines))["input_ids"], target_counts)
    named = named_ids(model, tokenizer, language_codes)
    separate = bool(getattr(tokenizer, "separate_vocabs", False))
    sizes = vocabulary_sizes(model)
    tokens = tokenizer_size(tokenizer)
    target_tokens = len(tokenizer.target_encoder) if separate else tokens
    for what, i in named.items():
        if not 0 <= i < min(tokens, target_tokens):
            raise ConfigError(f"trim_vocabulary: {what} is id {i}, which is not a token of the tokenizer "
                              f"({type(tokenizer).__name__}, ids 0–{tokens - 1}), so the kept vocabulary would miss "
                              f"it; fix the model's config, or set trim_vocabulary to false")
    frequent = lambda counts, size: {i for i, n in counts.items() if n >= min_count and i < size}  # noqa: E731
    specials = set(named.values()) | set(numbered_by_the_class(tokenizer))
    if separate:  # the named special tokens first on both sides, so that pad and eos have one id
        first = sorted(specials)
        source = first + sorted(frequent(source_counts, tokens) - specials)
        target = first + sorted(frequent(target_counts, target_tokens) - specials)
        return Trim(source, target, sizes, named, shared=False)
    kept = sorted(specials | frequent(source_counts + target_counts, tokens))  # one vocabulary: counted on both sides
    return Trim(kept, kept, sizes, named, shared=True)


def tokenizer_size(tokenizer) -> int:
    """One more than the largest id the tokenizer gives (M2M100's ``len()`` leaves out the language codes it
    numbers after its vocabulary)."""
    numbered = getattr(tokenizer, "lang_token_to_id", None) or {}
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1, max(numbered.values(), default=-1) + 1)


def numbered_by_the_class(tokenizer) -> list[int]:
    """The ids a tokenizer class numbers itself after its ``vocab.json`` (M2M100's language codes): kept
    all, in their order, as the class numbers them again after the trimmed vocabulary."""
    if hasattr(tokenizer, "lang_token_to_id") and hasattr(tokenizer, "encoder"):
        return list(range(len(tokenizer.encoder), tokenizer_size(tokenizer)))
    return []


def vocabulary_sizes(model: nn.Module) -> tuple[int, int]:
    """(rows of the encoder's token embedding, rows of the output projection)."""
    return model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]


# ---------------------------------------------------------------------------------------------
# The tokenizer


def _remap_config(config: dict, mapping: Mapping[int, int], tokens: Mapping[int, str]) -> dict:
    """tokenizer_config.json renumbered: ``added_tokens_decoder`` keeps the kept ids under their new
    ids; the lists of extra special tokens keep the kept ones; T5's ``extra_ids`` counts them."""
    kept_tokens = {tokens[old] for old in mapping if old in tokens}
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {str(mapping[int(old)]): value
                                          for old, value in config["added_tokens_decoder"].items()
                                          if int(old) in mapping}
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if (t["content"] if isinstance(t, dict) else t) in kept_tokens]
    if "extra_ids" in config:
        config["extra_ids"] = sum(1 for t in kept_tokens if t.startswith("<extra_id_"))
    return config


def _remap_ids(value, mapping: Mapping[int, int]):
    """A post-processor (or padding) section of tokenizer.json with its ids renumbered: special
    tokens whose ids are not kept are left out."""
    if isinstance(value, list):
        return [_remap_ids(v, mapping) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key == "special_tokens" and isinstance(v, dict):
            out[key] = {name: {**token, "ids": [mapping[i] for i in token["ids"]]} for name, token in v.items()
                        if all(i in mapping for i in token["ids"])}
        elif key == "pad_id" and isinstance(v, int) and v in mapping:
            out[key] = mapping[v]
        else:
            out[key] = _remap_ids(v, mapping)
    return out


def _parts(merge) -> tuple[str, str]:
    """The two pieces of a BPE merge, written "a b" (older tokenizer.json files) or ["a", "b"]."""
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


def bpe_ancestors(tokenizer_json: dict, kept: set[int]) -> set[int]:
    """The ids of the pieces a BPE ``tokenizer.json``'s merges build the ``kept`` pieces from, so that
    the trimmed tokenizer cuts text of kept pieces the same way (every merge it applied stays)."""
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    made_of: dict[str, tuple[str, str]] = {}
    for merge in model.get("merges", []):
        left, right = _parts(merge)
        made_of.setdefault(left + right, (left, right))
    pieces = {i: p for p, i in vocab.items()}
    todo, found = [pieces[i] for i in kept if i in pieces], set()
    while todo:
        piece = todo.pop()
        for part in made_of.get(piece, ()):
            if part in vocab and vocab[part] not in kept and vocab[part] not in found:
                found.add(vocab[part])
                todo.append(part)
    return found


def _rewrite_tokenizer_json(folder: Path, mapping: Mapping[int, int]) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model["type"] == "Unigram":
        pieces = model["vocab"]
        kept = sorted(old for old in mapping if old < len(pieces))
        assert [mapping[old] for old in kept] == list(range(len(kept)))  # the pieces come first, in order
        model["vocab"] = [pieces[old] for old in kept]
        if model.get("unk_id") is not None:
            model["unk_id"] = mapping.get(model["unk_id"])
    elif model["type"] == "BPE":
        vocab = {piece: mapping[old] for piece, old in model["vocab"].items() if old in mapping}
        model["vocab"] = vocab  # a merge stays when its two parts and its result do
        model["merges"] = [m for m in model.get("merges", [])
                           if all(p in vocab for p in (*_parts(m), "".join(_parts(m))))]
    else:  # checked by tokenizer_format first
        raise AssertionError(model["type"])
    data["added_tokens"] = [{**t, "id": mapping[t["id"]]} for t in data.get("added_tokens", []) if t["id"] in mapping]
    data["post_processor"] = _remap_ids(data.get("post_processor"), mapping)
    data["padding"] = _remap_ids(data.get("padding"), mapping)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _rewrite_vocab_json(folder: Path, name: str, mapping: Mapping[int, int]) -> None:
    path = folder / name
    vocab = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({piece: mapping[old] for piece, old in vocab.items() if old in mapping},
                               ensure_ascii=False, indent=2), encoding="utf-8")


def tokenizer_format(tokenizer, folder: Path) -> str:
    """How the tokenizer saved in ``folder`` maps pieces to ids, as this module rewrites it:
    "vocab.json" (MarianTokenizer, M2M100Tokenizer: sentencepiece pieces looked up in it),
    "tokenizer.json" (a Unigram or BPE model). Anything else is refused in one line."""
    name = type(tokenizer).__name__
    if (folder / "tokenizer.json").is_file():
        kind = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
        if kind in ("Unigram", "BPE"):
            return "tokenizer.json"
        raise ConfigError(f"trim_vocabulary: {name}'s tokenizer.json has a {kind} model, which this tool cannot "
                          f"rewrite (it rewrites Unigram and BPE models, and MarianMT's and M2M100's vocab.json); "
                          f"set trim_vocabulary to false")
    if (folder / "vocab.json").is_file() and hasattr(tokenizer, "encoder"):
        return "vocab.json"
    raise ConfigError(f"trim_vocabulary: {name} saves its vocabulary in a format this tool cannot rewrite (it "
                      f"rewrites MarianMT's and M2M100's vocab.json and tokenizer.json with a Unigram or BPE model); "
                      f"set trim_vocabulary to false")


def write_tokenizer(tokenizer, trim: Trim, folder: str | os.PathLike) -> None:
    """Save ``tokenizer`` into ``folder`` with the vocabulary of ``trim``, in its own format."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    kind = tokenizer_format(tokenizer, folder)
    source, target = trim.mapping("source"), trim.mapping("target")
    if kind == "tokenizer.json":
        _rewrite_tokenizer_json(folder, source)
    else:
        _rewrite_vocab_json(folder, "vocab.json", source)
        if not trim.shared:
            _rewrite_vocab_json(folder, "target_vocab.json", target)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    tokens = dict(enumerate(tokenizer.convert_ids_to_tokens(list(range(tokenizer_size(tokenizer))))))
    config = _remap_config(config, source, tokens)
    config[MARKER] = trim.summary()
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def _load(folder: Path, tokenizer):
    from transformers import AutoTokenizer

    languages = {k: v for k in ("src_lang", "tgt_lang") if (v := getattr(tokenizer, k, None))}
    return AutoTokenizer.from_pretrained(str(folder), **languages)


def trimmed_tokenizer(tokenizer, trim: Trim) -> tuple[object, Trim]:
    """(the tokenizer rewritten to the vocabulary of ``trim`` and loaded back with its own class, the
    ``trim`` with the tokens that class defines on its own added): each kept id's token must be the
    same after as before, or the format is refused in one line."""
    name = type(tokenizer).__name__
    with tempfile.TemporaryDirectory(prefix="trimmed-tokenizer-") as tmp:
        if trim.shared and tokenizer_format(tokenizer, _saved(tokenizer, Path(tmp) / "original")) == "tokenizer.json":
            data = json.loads((Path(tmp) / "original" / "tokenizer.json").read_text(encoding="utf-8"))
            if data["model"]["type"] == "BPE":
                more = bpe_ancestors(data, set(trim.source))
                trim = Trim(sorted(set(trim.source) | more), sorted(set(trim.source) | more), trim.before, trim.named)
        for attempt in range(2):  # once more with the tokens the class adds by itself (mBART's language codes)
            folder = Path(tmp) / f"trimmed-{attempt}"
            write_tokenizer(tokenizer, trim, folder)
            try:
                loaded = _load(folder, tokenizer)
            except Exception as e:  # noqa: BLE001 - the class cannot read what was written: refused below
                raise ConfigError(f"trim_vocabulary: {name} does not load the trimmed vocabulary "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); this tokenizer "
                                  f"format cannot be rewritten; set trim_vocabulary to false") from None
            added = loaded.convert_ids_to_tokens(list(range(len(trim.source), tokenizer_size(loaded))))
            if not added or attempt:
                break
            extra = {tokenizer.convert_tokens_to_ids(t) for t in added} - {tokenizer.unk_token_id}
            source = sorted(set(trim.source) | extra) if trim.shared else trim.source + sorted(extra - set(trim.source))
            trim = Trim(source, source if trim.shared else trim.target, trim.before, trim.named, trim.shared)
        check_same_tokens(tokenizer, loaded, trim)
        return loaded, trim


def _saved(tokenizer, folder: Path) -> Path:
    tokenizer.save_pretrained(folder)
    return folder


def check_same_tokens(old, new, trim: Trim) -> None:
    """Refuse a rewritten tokenizer whose ids do not name the kept tokens: its size must be the kept
    set's, and new id i must be the token old id ``trim.source[i]`` was."""
    name = type(old).__name__
    if tokenizer_size(new) != len(trim.source):
        raise ConfigError(f"trim_vocabulary: {name} loads the trimmed vocabulary of {len(trim.source):,} tokens with "
                          f"{tokenizer_size(new):,}; this tokenizer format cannot be rewritten; set trim_vocabulary "
                          f"to false")
    if trim.shared:
        before = old.convert_ids_to_tokens(trim.source)
        after = new.convert_ids_to_tokens(list(range(len(trim.source))))
    else:  # MarianTokenizer's separate vocabularies: ids name target tokens, its encoder maps source tokens
        source = trim.mapping("source")
        new_ids = {token: source[i] for token, i in old.encoder.items() if i in source}
        before, after = sorted(new_ids.items()), sorted(new.encoder.items())
        before += old.convert_ids_to_tokens(trim.target)
        after += new.convert_ids_to_tokens(list(range(len(trim.target))))
    wrong = [(b, a) for b, a in zip(before, after) if b != a] or \
        ([(f"{len(before):,} entries", f"{len(after):,}")] if len(before) != len(after) else [])
    if wrong:
        raise ConfigError(f"trim_vocabulary: {name} reads the trimmed vocabulary with other tokens ({wrong[0][0]!r} "
                          f"became {wrong[0][1]!r}, {len(wrong):,} in all); this tokenizer format cannot be "
                          f"rewritten; set trim_vocabulary to false")


# ---------------------------------------------------------------------------------------------
# The model


def _select_rows_(modules: list[nn.Module], rows: list[int]) -> None:
    """Keep ``rows`` of the weight the ``modules`` share (embeddings and a linear tied to them), as one
    new parameter for all of them again."""
    from torch import nn

    weight = nn.Parameter(modules[0].weight.detach()[rows].clone(), requires_grad=modules[0].weight.requires_grad)
    for module in modules:
        module.weight = weight
        if isinstance(module, nn.Embedding):
            module.num_embeddings = len(rows)
        elif isinstance(module, nn.Linear):
            module.out_features = len(rows)


def _remap(value, mapping: Mapping[int, int]):
    if isinstance(value, (list, tuple)):
        return type(value)(_remap(v, mapping) for v in value)
    return mapping[value] if value is not None else None


def trim_model_(model: nn.Module, trim: Trim) -> None:
    """Keep the rows of ``trim`` in ``model``'s token embeddings, output projection and
    ``final_logits_bias``, and renumber the ids its config and generation config name
    (``bad_words_ids`` and the suppressed tokens keep the kept ones). Ties stay ties."""
    import torch
    from torch import nn

    from matrix_decomposition import LowRankEmbedding, LowRankLinear

    if any(isinstance(m, (LowRankEmbedding, LowRankLinear)) for m in
           (model.get_input_embeddings(), model.get_output_embeddings())):
        raise ConfigError("trim_vocabulary: the model's token embedding or output projection is factorized already; "
                          "trim the vocabulary of the uncompressed model")
    source_embedding = getattr(model.get_encoder(), "embed_tokens", None) or model.get_input_embeddings()
    target_embedding = getattr(model.get_decoder(), "embed_tokens", None)
    head = model.get_output_embeddings()
    groups: dict[int, tuple[list[nn.Module], set[str]]] = {}  # {id of a weight: (the modules holding it, sides)}
    for module, side in ((source_embedding, "source"), (target_embedding, "target"), (head, "target")):
        if module is not None:
            groups.setdefault(id(module.weight), ([], set()))[1].add(side)
    for module in model.modules():  # every module holding one of these weights (shared, embed_tokens, lm_head)
        if isinstance(module, (nn.Embedding, nn.Linear)) and id(module.weight) in groups:
            groups[id(module.weight)][0].append(module)
    for modules, sides in groups.values():
        if len(sides) == 2 and trim.source != trim.target:
            raise ConfigError("trim_vocabulary: the model ties its source and target embeddings, but the tokenizer has "
                              "separate vocabularies; set trim_vocabulary to false")
        side = "source" if sides == {"source"} else "target"
        _select_rows_(modules, trim.source if side == "source" else trim.target)
        for module in modules:
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.padding_idx = trim.mapping(side).get(module.padding_idx)
    bias = getattr(model, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor):
        model.final_logits_bias = bias[:, trim.target].clone()

    source, target = trim.mapping("source"), trim.mapping("target")
    if not trim.shared:  # one id in the config for both sides: it must be one id after too
        for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(model.config, key, None)
            if value is not None and source.get(value, -1) != target.get(value, -2):
                raise ConfigError(f"trim_vocabulary: the model's config {key} {value} is not the same token in the "
                                  f"source and target vocabularies; set trim_vocabulary to false")
    config = model.config
    config.vocab_size = len(trim.source)  # separate vocabularies: the source's (decoder_vocab_size: the target's)
    if hasattr(config, "decoder_vocab_size"):
        config.decoder_vocab_size = len(trim.target)
    for where in (config, getattr(model, "generation_config", None)):
        if where is None:
            continue
        for key in CONFIG_IDS:
            value = getattr(where, key, None)
            if value is not None:
                setattr(where, key, _remap(value, target))
        if getattr(where, "bad_words_ids", None):
            where.bad_words_ids = [[target[i] for i in word] for word in where.bad_words_ids
                                   if all(i in target for i in word)] or None
        for key in ("suppress_tokens", "begin_suppress_tokens"):
            if getattr(where, key, None):
                setattr(where, key, [target[i] for i in getattr(where, key) if i in target] or None)
    setattr(config, MARKER, trim.summary())


# ---------------------------------------------------------------------------------------------
# The pairs, renumbered


def remap_rows(rows: Iterable[Sequence[int]], mapping: Mapping[int, int], unknown: int) -> list[list[int]]:
    """``rows`` of old ids in new ids: an id not kept becomes ``unknown`` (the new ``<unk>``), -100 stays."""
    return [[i if i < 0 else mapping.get(i, unknown) for i in row] for row in rows]


def remap_dataset(dataset, trim: Trim, unknown: int):
    """The tokenized pairs (``input_ids``: source ids, ``labels``: target ids) in the new ids."""
    source, target = trim.mapping("source"), trim.mapping("target")

    def renumber(batch):
        out = {"input_ids": remap_rows(batch["input_ids"], source, unknown)}
        if "labels" in batch:
            out["labels"] = remap_rows(batch["labels"], target, unknown)
        return out

    return dataset.map(renumber, batched=True, keep_in_memory=True, load_from_cache_file=False,  # nothing cached
                       new_fingerprint=f"{dataset._fingerprint}-trimmed-{len(trim.source)}-{len(trim.target)}")


# ---------------------------------------------------------------------------------------------
# The stage of a run, and the translate command's warning


@dataclass
class Trimmed:
    """What the trimming stage of a run gives: the trimmed models, tokenizer and pairs, and the counts."""

    teacher: nn.Module
    base: nn.Module
    tokenizer: object
    train_set: object
    eval_set: object
    trim: Trim
    params_before: int
    params_after: int

    def report(self) -> dict:
        return {**self.trim.summary(), "params_before": self.params_before, "params_after": self.params_after,
                "shared": self.trim.shared}


def check_trimmable(config, teacher: nn.Module, tokenizer) -> list[str]:
    """What ``trim_run`` refuses that needs no pairs, checked as soon as the models are loaded: the
    ``trim_vocabulary_files`` (their lines are returned), a tokenizer format this module cannot rewrite,
    a model already factorized, an id the config names that the tokenizer does not have."""
    from matrix_decomposition import LowRankEmbedding, LowRankLinear

    lines = text_file_lines(config.trim_vocabulary_files)
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        tokenizer_format(tokenizer, _saved(tokenizer, Path(tmp)))
    if any(isinstance(m, (LowRankEmbedding, LowRankLinear)) for m in
           (teacher.get_input_embeddings(), teacher.get_output_embeddings())):
        raise ConfigError("trim_vocabulary: the teacher's token embedding or output projection is factorized "
                          "already; trim the vocabulary of the uncompressed model")
    kept_ids(teacher, tokenizer, [[0]], [[0]], {"source_lang_code": config.source_lang_code,
                                               "target_lang_code": config.target_lang_code})
    return lines


def trim_run(config, teacher: nn.Module, base: nn.Module, tokenizer, train_set, eval_set) -> Trimmed:
    """The trimming stage of ``compress_model.run``: the kept set (``kept_ids``) from the tokenized
    training and evaluation pairs, the tokenizer rewritten (``trimmed_tokenizer``), the teacher and
    the model factorized (one model, or a separate student sharing the teacher's vocabulary) trimmed
    the same way, so that the teacher's logits are over the student's ids, and the pairs renumbered."""
    from matrix_decomposition import count_parameters

    languages = {"source_lang_code": config.source_lang_code, "target_lang_code": config.target_lang_code}
    extra = text_file_lines(config.trim_vocabulary_files)
    trim = kept_ids(teacher, tokenizer, [*train_set["input_ids"], *eval_set["input_ids"]],
                    [*train_set["labels"], *eval_set["labels"]], languages, extra, config.trim_vocabulary_min_count)
    new_tokenizer, trim = trimmed_tokenizer(tokenizer, trim)
    if config.kd_top_k > len(trim.target):
        raise ConfigError(f"kd_top_k: {config.kd_top_k} is more than the trimmed vocabulary ({len(trim.target):,} "
                          f"tokens kept by trim_vocabulary)")
    before = count_parameters(teacher)
    for model in {id(teacher): teacher, id(base): base}.values():
        trim_model_(model, trim)
    unknown = new_tokenizer.unk_token_id
    return Trimmed(teacher, base, new_tokenizer, remap_dataset(train_set, trim, unknown),
                   remap_dataset(eval_set, trim, unknown), trim, before, count_parameters(teacher))


def unknown_count(tokenizer, rows: Iterable[Sequence[int]]) -> int:
    """How many ``<unk>`` ids ``rows`` hold when ``tokenizer`` is a trimmed one (0 otherwise)."""
    if MARKER not in getattr(tokenizer, "init_kwargs", {}) or tokenizer.unk_token_id is None:
        return 0
    return sum(row.count(tokenizer.unk_token_id) for row in rows)


def warn_unknown(tokenizer, rows: Iterable[Sequence[int]], warn) -> None:
    """Tell ``warn`` in one line how many pieces of the input a trimmed tokenizer turned into ``<unk>``."""
    count = unknown_count(tokenizer, rows)
    if count:
        many = count > 1
        warn(f"{count:,} token{'s' if many else ''} of the input {'are' if many else 'is'} outside the model's "
             f"trimmed vocabulary (trim_vocabulary) and read as <unk>; {'their words' if many else 'its word'} may be "
             f"lost")
