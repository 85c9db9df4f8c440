"""How far the shipped teacher's predictions move when its shared embedding alone is factorized,
by plain SVD and by the activation-aware init's weighting (``calibration.embedding_weighting``)
and its two halves, at several ranks.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_embedding_init      # ~2 min on one thread
    python -m benchmarks.bench_embedding_init --quick                # smoke test: seconds

The statistics come from the first ``--samples`` shipped training pairs (the tool's
``calibration_samples``); the drift (``rank_allocation.output_drift``: the mean KL divergence from
the unchanged teacher's predictions per target token, teacher-forced) is measured on ``--pairs``
pairs from ``--eval`` that the statistics did not see: by default pairs 1000– of
../shared/data/tatoeba_en_de/dev.csv, else the shipped eval.csv.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

import compress_model  # noqa: E402
from benchmarks import write_json  # noqa: E402
from mdcompress import data  # noqa: E402
from mdcompress.calibration import calibration_batches, gather_input_grams  # noqa: E402
from matrix_decomposition import Weighting, load_pretrained, low_rank_factors  # noqa: E402
from mdcompress.rank_allocation import _real_token_log_probs, output_drift  # noqa: E402

SHARED_DEV = REPO.parent / "shared" / "data" / "tatoeba_en_de" / "dev.csv"


def tokenized_batches(path: str, skip: int, count: int, tokenizer, config) -> list[dict]:
    pairs = data.load_pairs(path, config).select(range(skip, skip + count))
    tokenized = data.preprocess(pairs, tokenizer, config, compress_model.default_data_preprocessor)
    return calibration_batches(tokenized, tokenizer, count, config.batch_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(REPO / "models" / "teacher-en-de"))
    ap.add_argument("--samples", type=int, default=256, help="calibration pairs (default: the tool's 256)")
    ap.add_argument("--eval", default=str(SHARED_DEV if SHARED_DEV.is_file() else
                                          REPO / "data" / "tatoeba_en_de" / "eval.csv"))
    ap.add_argument("--skip", type=int, default=1000 if SHARED_DEV.is_file() else 0)
    ap.add_argument("--pairs", type=int, default=256, help="pairs the drift is measured on")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 85, 104])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="8 + 8 pairs, two ranks: checks the script runs")
    ap.add_argument("--json", help="also write the drifts here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.pairs, args.ranks = 8, 8, [16, 104]

    teacher, tokenizer = load_pretrained(args.teacher)
    teacher.eval()
    config = compress_model.Config(teacher_model_path=args.teacher,
                                   dataset_path=str(REPO / "data" / "tatoeba_en_de" / "train.csv"))
    calibration = tokenized_batches(config.dataset_path, 0, args.samples, tokenizer, config)
    measured = tokenized_batches(args.eval, args.skip, args.pairs, tokenizer, config)
    name = "model.shared"
    init = gather_input_grams(teacher, [name], calibration)[name]
    variants = {
        "plain SVD": None,
        "tied head's input Gram only": Weighting(gram=init.gram),
        "token counts only": Weighting(rows=init.rows),
        "both (the activation init)": init,
    }
    embedding = teacher.get_submodule(name).weight
    original = embedding.detach().clone()
    with torch.no_grad():
        reference = [_real_token_log_probs(teacher, batch) for batch in measured]
        drift: dict[str, list[float]] = {}
        try:
            for label, weighting in variants.items():
                up, down, note = low_rank_factors(original, max(args.ranks), input_gram=weighting)
                assert note is None, note
                for rank in args.ranks:
                    embedding.copy_(up[:, :rank] @ down[:rank])  # the rank-r factors are the first r
                    drift.setdefault(label, []).append(output_drift(teacher, measured, reference))
        finally:
            embedding.copy_(original)

    print(f"{name} {tuple(original.shape)} of {args.teacher}: statistics from {args.samples} training pairs, drift "
          f"(mean KL per target token) on {args.pairs} pairs of {args.eval} [{args.skip}:]\n")
    print("| factorization | " + " | ".join(f"rank {r}" for r in args.ranks) + " |")
    print("|---|" + "---:|" * len(args.ranks))
    for label, values in drift.items():
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    if args.json:
        write_json(args.json, {"layer": name, "shape": list(original.shape), "samples": args.samples,
                               "pairs": args.pairs, "eval": args.eval, "skip": args.skip, "ranks": args.ranks,
                               "drift": drift})
    return 0


if __name__ == "__main__":
    sys.exit(main())
