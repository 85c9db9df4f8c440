"""Time the sensitivity rank allocation (``rank_allocation: "sensitivity"``) on the shipped teacher
and show what it allocates at a budget, next to the spectrum allocation.

    python -m benchmarks.bench_sensitivity                 # ~3.5 min on one thread
    python -m benchmarks.bench_sensitivity --quick         # smoke test: 8 pairs, 4 layers, seconds

Measures ``rank_allocation.sensitivity_errors`` over every linear of the layers and the shared
embedding (``decompose_layers: ["*"]``) on the first ``--samples`` shipped training pairs, the
tool's defaults (256 pairs, batches of 32, 8 ranks + rank 1 per layer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

import compress_model  # noqa: E402
from benchmarks import write_json  # noqa: E402
from mdcompress import data  # noqa: E402
from mdcompress.calibration import calibration_batches  # noqa: E402
from matrix_decomposition import resolve_ranks  # noqa: E402
from mdcompress.rank_allocation import ranks_for_ratio, sensitivity_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(REPO / "models" / "teacher-en-de"))
    ap.add_argument("--samples", type=int, default=256, help="calibration pairs")
    ap.add_argument("--ratio", type=float, default=0.5, help="target_ratio to allocate for")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="8 pairs and 4 layers: checks the script runs")
    ap.add_argument("--json", help="also write the timing and both allocations here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = compress_model.Config(teacher_model_path=args.teacher,
                                   dataset_path=str(REPO / "data" / "tatoeba_en_de" / "train.csv"))
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(args.teacher).eval()
    samples = 8 if args.quick else args.samples
    pairs = data.load_pairs(config.dataset_path, config).select(range(samples))
    train = data.preprocess(pairs, tokenizer, config, compress_model.default_data_preprocessor)
    batches = calibration_batches(train, tokenizer, samples, config.batch_size)
    names = list(resolve_ranks(teacher, ["*"], 1))
    if args.quick:
        names = names[:4]

    started = time.perf_counter()
    errors = sensitivity_errors(teacher, names, batches)
    seconds = time.perf_counter() - started
    print(f"sensitivity of {len(names)} layers on {samples} pairs ({len(batches)} batches), "
          f"{args.threads} thread(s): {seconds:.0f} s")

    ratio = args.ratio
    if args.quick:  # four layers cannot move the whole model to 50%: allocate half of their weights
        kept = sum(p.numel() for p in teacher.parameters())
        layer_weights = sum(teacher.get_submodule(n).weight.numel() for n in names)
        ratio = (kept - layer_weights / 2) / kept
    by_spectrum = ranks_for_ratio(teacher, names, ratio)
    by_sensitivity = ranks_for_ratio(teacher, names, ratio, errors=errors)
    print(f"\nranks at target_ratio {ratio:.3f}\n| layer | spectrum | sensitivity |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {by_spectrum[name]} | {by_sensitivity[name]} |")
    if args.json:
        write_json(args.json, {"layers": names, "samples": samples, "batches": len(batches), "threads": args.threads,
                               "seconds": seconds, "target_ratio": ratio,
                               "ranks": {"spectrum": by_spectrum, "sensitivity": by_sensitivity}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
