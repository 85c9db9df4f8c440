"""What trimming the vocabulary (``trim_vocabulary``) costs the shipped teacher: its greedy translations of
held-out pairs before and after trimming to the tokens of the training pairs, and their BLEU.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_vocabulary       # 1,000 held-out pairs: about 1 min
    python -m benchmarks.bench_vocabulary --quick                 # 50 held-out pairs, 2,000 training pairs: seconds

The kept set is what a run keeps (``vocabulary.kept_ids``: the special tokens and every token of the
``--train`` pairs, source and target, one union). The held-out pairs are ``--pairs`` pairs of ``--eval``
from row ``--skip``: by default rows 1000–1999 of ../shared/data/tatoeba_en_de/dev.csv (no setting of the
tool was chosen on them), else the shipped eval.csv. A translation may change only where the untrimmed
teacher emitted a token the trimmed one does not have, or where the source holds one (it reads as
``<unk>``): both are counted, and so are the changes with neither cause, which should be none. The
union is also set against a target-only output projection: how many rows each needs.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import write_json  # noqa: E402
from matrix_decomposition import count_parameters, load_pretrained  # noqa: E402
from mdcompress import vocabulary  # noqa: E402
from mdcompress.data import read_pairs  # noqa: E402
from mdcompress.evaluation import corpus_scores  # noqa: E402
from mdcompress.translate import TorchTranslator, length_bounds  # noqa: E402

SHARED_DEV = REPO.parent / "shared" / "data" / "tatoeba_en_de" / "dev.csv"


def greedy_ids(model, tokenizer, sources: list[list[int]], batch_size: int = 64, max_new_tokens: int = 128) -> list:
    """Greedy translations (token ids, without the decoder start) of tokenized ``sources``, each bounded as the
    tool bounds it (``length_bounds``, the default factor)."""
    from mdcompress.translate import DEFAULT_MAX_LENGTH_FACTOR

    translator, out = TorchTranslator(model, tokenizer), []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        longest = max(map(len, chunk))
        ids = np.full((len(chunk), longest), tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, source in enumerate(chunk):
            ids[row, :len(source)], mask[row, :len(source)] = source, 1
        bounds = length_bounds([len(s) for s in chunk], max_new_tokens, DEFAULT_MAX_LENGTH_FACTOR)
        rows = translator.generate(ids, mask, max_new_tokens=max_new_tokens, bounds=bounds)
        out += [row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                for row in rows]  # without the padding of the batch, which depends on the other translations
    return out


def compare(teacher, tokenizer, train_pairs, eval_pairs, batch_size: int = 64) -> dict:
    """Trim a copy of ``teacher`` to the tokens of ``train_pairs`` and translate the sources of
    ``eval_pairs`` with both: the counts and scores described in the module's docstring."""
    started = time.perf_counter()
    source_rows = tokenizer([s for s, _ in train_pairs])["input_ids"]
    target_rows = tokenizer(text_target=[t for _, t in train_pairs])["input_ids"]
    trim = vocabulary.kept_ids(teacher, tokenizer, source_rows, target_rows)
    trimmed_tokenizer, trim = vocabulary.trimmed_tokenizer(tokenizer, trim)
    trimmed = copy.deepcopy(teacher)
    vocabulary.trim_model_(trimmed, trim)
    trim_seconds = time.perf_counter() - started
    kept, back = trim.mapping("target"), np.array(trim.target)

    sources = tokenizer([s for s, _ in eval_pairs])["input_ids"]
    new_sources = trimmed_tokenizer([s for s, _ in eval_pairs])["input_ids"]
    assert new_sources == vocabulary.remap_rows(sources, trim.mapping("source"), trimmed_tokenizer.unk_token_id)
    before = greedy_ids(teacher, tokenizer, sources, batch_size)
    after = [back[row].tolist() for row in greedy_ids(trimmed, trimmed_tokenizer, new_sources, batch_size)]
    emitted = [any(i not in kept for i in row) for row in before]
    unknown_source = [any(i not in kept for i in row) for row in sources]
    changed = [a != b for a, b in zip(before, after)]
    references = [t for _, t in eval_pairs]
    scores = {name: corpus_scores(tokenizer.batch_decode(rows, skip_special_tokens=True), references)
              for name, rows in (("untrimmed", before), ("trimmed", after))}
    target_only = len({i for row in target_rows for i in row} | set(trim.named.values()))
    source_only = len({i for row in source_rows for i in row} | set(trim.named.values()))
    d_model = teacher.config.d_model
    return {
        "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
        "vocabulary_before": trim.before[0], "vocabulary_after": len(trim.source),
        "params_before": count_parameters(teacher), "params_after": count_parameters(trimmed),
        "trim_seconds": round(trim_seconds, 1),
        "changed": sum(changed), "changed_percent": round(100 * sum(changed) / len(eval_pairs), 2),
        "untrimmed_emitted_a_dropped_token": sum(emitted),
        "source_had_a_dropped_token": sum(unknown_source),
        "changed_with_neither": sum(c and not e and not u for c, e, u in zip(changed, emitted, unknown_source)),
        "bleu_untrimmed": scores["untrimmed"]["bleu"], "bleu_trimmed": scores["trimmed"]["bleu"],
        "bleu_change": round(scores["trimmed"]["bleu"] - scores["untrimmed"]["bleu"], 2),
        "chrf_untrimmed": scores["untrimmed"]["chrf"], "chrf_trimmed": scores["trimmed"]["chrf"],
        # one union (tied) against separate vocabularies with a target-only output projection
        "union_rows": len(trim.source), "source_only_rows": source_only, "target_only_rows": target_only,
        "output_projection_macs_union": len(trim.source) * d_model,
        "output_projection_macs_target_only": target_only * d_model,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(REPO / "models" / "teacher-en-de"))
    ap.add_argument("--train", default=str(REPO / "data" / "tatoeba_en_de" / "train.csv"))
    ap.add_argument("--eval", default=str(SHARED_DEV if SHARED_DEV.is_file() else
                                          REPO / "data" / "tatoeba_en_de" / "eval.csv"))
    ap.add_argument("--skip", type=int, default=1000 if SHARED_DEV.is_file() else 0)
    ap.add_argument("--pairs", type=int, default=1000, help="held-out pairs translated")
    ap.add_argument("--train-pairs", type=int, default=None, help="the first N training pairs (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="50 held-out pairs, 2,000 training pairs")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.pairs, args.train_pairs = 50, 2000

    teacher, tokenizer = load_pretrained(args.teacher)
    train_pairs = read_pairs(args.train)[:args.train_pairs]
    eval_pairs = read_pairs(args.eval)[args.skip:args.skip + args.pairs]
    shown = lambda path: os.path.relpath(path, REPO)  # noqa: E731  (the results hold no path of this machine)
    result = {"teacher": shown(args.teacher), "train": shown(args.train), "eval": shown(args.eval), "skip": args.skip,
              **compare(teacher, tokenizer, train_pairs, eval_pairs)}
    print(f"vocabulary {result['vocabulary_before']:,} → {result['vocabulary_after']:,} tokens (the tokens of "
          f"{result['train_pairs']:,} training pairs); params {result['params_before']:,} → "
          f"{result['params_after']:,}")
    print(f"{result['eval_pairs']:,} held-out pairs (rows {args.skip}–{args.skip + result['eval_pairs'] - 1} of "
          f"{args.eval}): {result['changed']} translations changed ({result['changed_percent']}%); the untrimmed "
          f"teacher emitted a dropped token in {result['untrimmed_emitted_a_dropped_token']}, the source held one in "
          f"{result['source_had_a_dropped_token']}, changed with neither: {result['changed_with_neither']}")
    print(f"BLEU {result['bleu_untrimmed']:.2f} → {result['bleu_trimmed']:.2f} ({result['bleu_change']:+.2f}); "
          f"chrF {result['chrf_untrimmed']:.2f} → {result['chrf_trimmed']:.2f}")
    print(f"rows: one union {result['union_rows']:,}; separate vocabularies {result['source_only_rows']:,} source + "
          f"{result['target_only_rows']:,} target (the output projection {result['target_only_rows']:,} rows instead "
          f"of {result['union_rows']:,})")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
