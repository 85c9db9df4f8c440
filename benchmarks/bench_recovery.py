"""Recovery at half the teacher's size in the default run's budget: which recipe keeps the most BLEU,
over several seeds, on pairs no decision looked at.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_recovery --recipes paper ce --json benchmarks/results/recovery_50.json
    OMP_NUM_THREADS=1 python -m benchmarks.bench_recovery --recipes cached paper2     # ~25 min each
    OMP_NUM_THREADS=1 python -m benchmarks.bench_recovery --default-job --recipes paper shipped --seeds 2 --max-steps 300
                                                                   # what a step of each costs in a real run
    OMP_NUM_THREADS=1 python -m benchmarks.bench_recovery --recipes shipped --set learning_rate=3e-4 --seeds 1 \
        --eval data/tatoeba_en_de/eval.csv --skip 0                # a tuning run: any config key on top
    python -m benchmarks.bench_recovery --quick --seeds 1                             # smoke test

Every run is the tool itself (``compress_model.run``) on the shipped teacher: every linear of its
layers and the shared embedding factorized (``decompose_layers: ["*"]``) to ``--ratio`` of its total
parameters (``target_ratio``, activation-aware init), recovered on ``--train`` (the shipped 20,000
pairs by default), evaluated by greedy BLEU on ``--eval``: by default pairs 1000–1999 of
../shared/data/tatoeba_en_de/dev.csv, which no default was tuned on (the shipped eval.csv is pairs
0–999, on which they were). ``--default-job`` factorizes as the shipped
config.json does instead (rank 32 on every linear of the layers, 66% of the parameters). The recipes
differ only in the keys shown in ``RECIPES``; fractional
epochs are run as ``max_steps``. Each run gets a cache folder of its own, so the cached recipe pays
for its teacher pass every time. The rank-sensitivity measurement does not depend on the seed (it
reads the first ``calibration_samples`` pairs), so it is measured once and shared, as a sweep does;
``--ranks-from`` an earlier ``--json`` of the same ``--ratio`` reuses its ranks and skips it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

import compress_model  # noqa: E402
from mdcompress import data  # noqa: E402
from mdcompress.sweep import SweepMemory  # noqa: E402

SHARED_DEV = REPO.parent / "shared" / "data" / "tatoeba_en_de" / "dev.csv"
CACHED = {"loss_weights": {"ce": 1.0, "kd": 1.0, "feature": 0.0}, "kd_top_k": 16, "learning_rate": 1e-3}
RECIPES = {  # key: (name, config changes, epochs)
    "paper": ("paper: ce + kd + feature, lr 3e-4, 1 epoch (Config's defaults)", {}, 1.0),
    "ce": ("ce only, lr 1e-3, 1.5 epochs", {"loss_weights": {"ce": 1.0, "kd": 0.0, "feature": 0.0},
                                             "learning_rate": 1e-3}, 1.5),
    "cached": ("ce + kd from the cached top-16 (kd_top_k 16), lr 1e-3", CACHED, 1.0),
    "paper2": ("paper, 2 epochs", {}, 2.0),
    # at the default's wall time: a paper step costs 2.11 plain steps, an online kd step 1.99, a cached kd
    # step 1.12 and its cache 0.44 per pair, once (BENCHMARKS.md, "Step cost at the shipped size")
    "ce_wall": ("ce only, lr 1e-3, 2.11 epochs (the default's wall time)",
                {"loss_weights": {"ce": 1.0, "kd": 0.0, "feature": 0.0}, "learning_rate": 1e-3}, 2.11),
    "kd_wall": ("ce + kd, lr 1e-3, 1.06 epochs (the default's wall time)",
                {"loss_weights": {"ce": 1.0, "kd": 1.0, "feature": 0.0}, "learning_rate": 1e-3}, 1.06),
    "cached_wall": ("ce + kd from the cached top-16, lr 1e-3, 1.49 epochs (the default's wall time)", CACHED, 1.49),
}
SHIPPED = json.loads((REPO / "config.json").read_text())
RECIPES["shipped"] = (f"the shipped config.json: loss_weights {json.dumps(SHIPPED['loss_weights'])}, lr "
                      f"{SHIPPED['learning_rate']:g}, {SHIPPED['epoch']} epochs",
                      {key: SHIPPED[key] for key in ("loss_weights", "learning_rate")}, float(SHIPPED["epoch"]))


def held_out_csv(source: Path, skip: int, folder: Path) -> Path:
    return data.write_pairs(folder / "held-out.csv", data.read_pairs(source)[skip:])


def run_one(base: dict, changes: dict, epochs: float, seed: int, folder: Path, shared: SweepMemory) -> dict:
    # a cache of its own: every run pays for its teacher's top-k logits, as a first run does
    config = compress_model.Config(**{**base, **changes, "seed": seed, "output_path": str(folder / "out"),
                                      "overwrite_output": True, "cache_dir": str(folder / "cache")})
    if epochs != int(epochs) or base.get("max_steps"):
        steps_per_epoch = math.ceil(min(config.max_train_samples or 10**12, rows(config.dataset_path))
                                    / config.batch_size)
        config = compress_model.Config(**{**vars(config), "epoch": math.ceil(epochs),
                                          "max_steps": base.get("max_steps") or math.ceil(epochs * steps_per_epoch)})
    else:
        config = compress_model.Config(**{**vars(config), "epoch": int(epochs)})
    assert compress_model.run(config, shared=shared) == 0
    return json.loads((folder / "out" / "report.json").read_text())


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE of --set: VALUE read as JSON (3e-4, true, "x", [..]) or, failing that, as a string."""
    key, sep, value = text.partition("=")
    if not sep or key not in compress_model.Config.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with KEY a config key")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


ALLOCATION_KEYS = ("target_ratio", "k_info", "decompose_layers", "init", "rank_allocation", "calibration_samples",
                   "svd", "teacher_model_path")  # what the ranks of a --ratio run depend on, with --train


def first_run_of(path, error, writer: str = "this script") -> tuple[dict, dict]:
    """(the arguments, the report of the first run) of a ``--json`` this script wrote; anything else is
    refused (``error``, one line, naming the ``writer`` expected)."""
    try:
        earlier = json.loads(Path(path).read_text())
        return earlier["args"], next(iter(earlier["results"].values()))[0]
    except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration, AttributeError) as e:
        error(f"--ranks-from {path}: not a --json written by {writer} ({type(e).__name__}: {e})")


def earlier_ranks(args, overrides: dict, error) -> dict[str, int]:
    """The ranks of the first run in ``--ranks-from``, refused (``error``, one line) unless that run
    allocated them for the same --ratio, --train and allocation keys as this one."""
    path = args.ranks_from
    before, first = first_run_of(path, error)
    try:
        ranks, before_set, ratio, train = first["ranks"], dict(before["set"]), before["ratio"], before["train"]
    except (KeyError, TypeError, ValueError) as e:
        error(f"--ranks-from {path}: not a --json written by this script ({type(e).__name__}: {e})")
    if before.get("default_job"):
        error(f"--ranks-from {path}: a --default-job run, whose ranks are the shipped config's, not an allocation")
    # (a run that reused ranks itself keeps its --ratio; its reports say target_ratio null)
    if ratio != args.ratio or Path(train).parts[-3:] != Path(args.train).parts[-3:]:  # or in another checkout
        error(f"--ranks-from {path}: its ranks were allocated for --ratio {ratio} on {train}, "
              f"not --ratio {args.ratio} on {args.train}")
    for key in ALLOCATION_KEYS:
        if before_set.get(key) != overrides.get(key):
            error(f"--ranks-from {path}: --set {key} was {json.dumps(before_set.get(key))} there and is "
                  f"{json.dumps(overrides.get(key))} here; the ranks depend on it")
    return ranks


def rows(path: str) -> int:
    return len(data.read_pairs(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, default=0.5, help="target_ratio (default 0.5)")
    size.add_argument("--default-job", action="store_true",
                      help="factorize as the shipped config.json does (k_info 32 on every linear of the layers, svd "
                           "init: 66%% of the parameters) instead of --ratio")
    ap.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    ap.add_argument("--seeds", type=int, default=3, help="seeds per recipe (42, 43, …)")
    ap.add_argument("--first-seed", type=int, default=42, help="the first seed (to split seeds over processes)")
    ap.add_argument("--epochs", type=float, help="epochs for every recipe instead of the table's")
    ap.add_argument("--train", default=str(REPO / "data" / "tatoeba_en_de" / "train.csv"))
    ap.add_argument("--eval", default=str(SHARED_DEV if SHARED_DEV.is_file() else
                                          REPO / "data" / "tatoeba_en_de" / "eval.csv"))
    ap.add_argument("--skip", type=int, default=1000 if SHARED_DEV.is_file() else 0,
                    help="evaluation pairs skipped (default: the 1,000 of dev.csv that are the shipped eval.csv)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int,
                    help="time the recipes instead: this many steps each, BLEU on 32 pairs only (the table's "
                         "train s / steps is then what a step of each recipe costs in a real run)")
    ap.add_argument("--quick", action="store_true", help="a few steps on a few pairs: checks the script runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=setting,
                    help="a config key for every recipe, on top of its own (VALUE as JSON, else a string), "
                         "e.g. --set learning_rate=3e-4 --set init=activation; repeatable")
    ap.add_argument("--ranks-from", metavar="JSON",
                    help="the ranks of the first run in an earlier --json of this script instead of allocating "
                         "them again (skips the sensitivity pass); refused unless it ran at the same --ratio, "
                         "--train and allocation keys (--set init, calibration_samples, ...)")
    ap.add_argument("--json", help="also write the raw reports here")
    args = ap.parse_args(argv)
    if args.ranks_from and args.default_job:
        ap.error("--ranks-from replaces the allocation of --ratio; --default-job has fixed ranks already")
    overrides = dict(args.set)
    suffix = "".join(f", {key} {json.dumps(value)}" for key, value in overrides.items())
    recipes = {}
    for key in args.recipes:
        name, changes, epochs = RECIPES[key]
        if args.epochs and args.epochs != epochs:  # the name gives the table's epochs: say what ran instead
            name, epochs = f"{name}, run for {args.epochs:g} epochs (--epochs)", args.epochs
        recipes[name + suffix] = ({**changes, **overrides}, epochs)

    base = {"teacher_model_path": str(REPO / "models" / "teacher-en-de"), "dataset_path": args.train,
            "decompose_layers": ["*"], "target_ratio": args.ratio, "init": "activation", "k_info": None,
            "num_threads": args.threads, "progress": False, "checkpoint_steps": 0, "export": []}
    if args.default_job:
        base.update(decompose_layers=SHIPPED["decompose_layers"], k_info=SHIPPED["k_info"], target_ratio=None,
                    init=compress_model.Config.__dataclass_fields__["init"].default)
    if args.ranks_from:
        base.update(k_info=earlier_ranks(args, overrides, ap.error), target_ratio=None)
    if args.max_steps:
        base.update(max_steps=args.max_steps, max_eval_samples=32)
    if args.quick:
        base.update(max_train_samples=64, max_eval_samples=8, max_new_tokens=16, max_steps=2, calibration_samples=8)
    results: dict[str, list[dict]] = {}
    shared = SweepMemory()  # the teacher evaluated and the sensitivity measured once, as a sweep does
    with tempfile.TemporaryDirectory() as tmp:
        base["eval_dataset_path"] = str(held_out_csv(Path(args.eval), args.skip, Path(tmp)))
        for name, (changes, epochs) in recipes.items():
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                report = run_one(base, changes, epochs, seed, Path(tmp) / f"{len(results)}-{seed}", shared)
                results.setdefault(name, []).append(report)
                print(f"{name}, seed {seed}: BLEU {report['student']['bleu']:.2f} "
                      f"(teacher {report['teacher']['bleu']:.2f}), {report['train_seconds']:.0f} s training "
                      f"+ {report.get('teacher_cache_seconds', 0):.0f} s teacher cache", flush=True)

    teacher = next(iter(results.values()))[0]["teacher"]
    first = next(iter(results.values()))[0]
    print(f"\nteacher {teacher['params']:,} params, BLEU {teacher['bleu']:.2f} on {first['eval_pairs']:,} pairs "
          f"({args.eval} [{args.skip}:]); student {first['student']['params']:,} params "
          f"({100 * first['compression_ratio']:.1f}%), trained on {args.train}\n")
    print("| recipe | BLEU per seed | mean BLEU (% of teacher) | spread | train s (+ cache s) | steps |")
    print("|---|---|---:|---:|---:|---:|")
    for name, reports in results.items():
        bleu = [r["student"]["bleu"] for r in reports]
        mean = statistics.mean(bleu)
        train = statistics.mean(r["train_seconds"] for r in reports)
        cache = statistics.mean(r.get("teacher_cache_seconds", 0) for r in reports)
        print(f"| {name} | {', '.join(f'{b:.2f}' for b in bleu)} | {mean:.2f} ({100 * mean / teacher['bleu']:.1f}%) "
              f"| {max(bleu) - min(bleu):.2f} | {train:.0f} (+ {cache:.0f}) | {reports[0]['optimizer_steps']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
