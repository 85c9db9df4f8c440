"""How much quality is kept at a given size: SVD factorization + recovery against a layer-dropping student.

    nice -n 5 python -m benchmarks.bench_quality --threads 2 --json benchmarks/results/quality.json
        # the full run: ~30 min on 2 shared cores (BENCHMARKS.md has its table)
    OMP_NUM_THREADS=1 python -m benchmarks.bench_quality --quick --threads 1
        # smoke test: a tiny random teacher, 3 steps, 64 pairs; seconds

The teacher (default ``models/teacher-en-de``, written by ``scripts/train_teacher.py``) is evaluated
and compressed to each target size (default 70% and 50%). Sizes are counted on the parameters of the
encoder/decoder layers (the compressible, "non-embedding" parameters, as papers report): the shared
embedding and the sinusoidal position tables are never factorized, and a layer-dropping student keeps
them whole too, so a share of the *total* is out of reach for both (with the default teacher the
embeddings are ~45% of it). Both shares are in the table. Per size, the rows are:

  SVD, no training      every linear of the layers factorized at the one rank k_info that brings the
                        layer parameters closest to the target (``build_student(teacher, [], k)``)
  SVD + ce              the same, fine-tuned on the references only (loss_weights ce=1)
  SVD + ce + kd         plus output distillation (KL to the teacher's softened outputs, T=2)
  SVD + ce + kd + feat  plus feature distillation: MSE on the output of every decomposed layer
                        (the paper's recipe, Ben Noach & Goldberg 2020)
  layer-drop e+d        the peer: a MarianMT with fewer layers, initialized by copying the embeddings
                        and alternating layers of the teacher (first and last kept, as in the distilled
                        Marian/BART students of Shleifer & Rush 2020), the (e, d) closest in layer
                        parameters to the SVD student; trained with ce + kd (the Distiller's hidden
                        term pairs layers index by index and needs equal depth, so it is not used)

Every trained row gets the same budget: the same optimizer steps, batch size, AdamW learning rate,
warm-up and linear decay, seed and data order (``Distiller`` with ``max_steps``; by default 600 steps
of 32 pairs, about one pass over the 20k training pairs, at the project's default lr 3e-4, 6%
warm-up). BLEU and chrF are sacrebleu corpus scores of greedy translations of the eval pairs
(default: the 2,000 dev pairs, which the teacher never saw).

Generation speed is measured at the end, every model in the same process, round-robin in a
rotating order after one warm-up pass each; the table gives the median over rounds of
(teacher seconds / model seconds) within a round, so > 1 is faster than the teacher:
  greedy translation   ``translate`` of the first ``--speed-sentences`` eval sentences (batches of
                       64). A batch runs until its longest output ends, so a model that sometimes
                       repeats itself up to ``--max-new-tokens`` is slow for that reason alone.
  fixed length         exactly ``--fixed-tokens`` new tokens for the first 64 of them: the same
                       decoder steps for every model, so only the architecture differs.
The JSON keeps the mean output length of every row. Training seconds are the wall time of the
``Distiller`` loop. The machine is shared: compare ratios from one run, not absolute times.

Targets (reported, not asserted): at <= 50% of the teacher's layer parameters, >= 97% of its BLEU
after recovery (the paper's recipe), and ahead of the layer-dropping student of the same size.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
from transformers import MarianConfig, MarianMTModel, MarianTokenizer, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from compress_model import Config, ConfigError, default_data_preprocessor  # noqa: E402
from mdcompress.data import DataError, load_pairs, preprocess  # noqa: E402
from decomposition import build_student, distill  # noqa: E402
from distillation.knowledge_distillation import DistillationSettings  # noqa: E402
from mdcompress.evaluation import corpus_scores  # noqa: E402
from mdcompress.files import write_text_atomic  # noqa: E402
from matrix_decomposition import (  # noqa: E402
    DecompositionError,
    count_parameters,
    default_targets,
    load_pretrained,
    low_rank_parameters,
    max_saving_rank,
)
from mdcompress.translate import translate  # noqa: E402

TARGET_RETENTION = 97.0  # % of the teacher's BLEU kept at <= 50% of its layer parameters, after recovery
FULL = dict(teacher="models/teacher-en-de", train="data/tatoeba_en_de/train.csv",
            eval="../shared/data/tatoeba_en_de/dev.csv", sizes="0.7,0.5", steps=600, batch_size=32,
            train_pairs=None, eval_pairs=None, max_length=64, max_new_tokens=128, speed_sentences=256,
            speed_repeats=5, fixed_tokens=32, threads=2)
QUICK = dict(FULL, teacher=None, eval="data/tatoeba_en_de/eval.csv", steps=3, batch_size=8, train_pairs=64,
             eval_pairs=16, max_length=32, max_new_tokens=12, speed_sentences=8, speed_repeats=1, fixed_tokens=4,
             threads=1)
QUICK_TEACHER = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
# name → loss weights of the rows trained on top of the factorized student
RECOVERY = {"ce": {"ce": 1.0}, "ce + kd": {"ce": 1.0, "kd": 1.0},
            "ce + kd + feature": {"ce": 1.0, "kd": 1.0, "feature": 1.0}}
PEER_WEIGHTS = {"ce": 1.0, "kd": 1.0}


class BenchError(ValueError):
    """A user-facing problem with the arguments (one-line message, exit 2)."""


# ---------------------------------------------------------------------------------------------
# Sizes


def layer_parameters(model: torch.nn.Module) -> int:
    """Parameters inside the encoder/decoder layers (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for name, param in model.named_parameters():
        if ".layers." in f".{name}.":
            seen[id(param)] = param.numel()
    return sum(seen.values())


def rank_for_fraction(teacher: torch.nn.Module, fraction: float) -> tuple[int, int]:
    """The uniform rank whose factorized layer parameters are closest to ``fraction`` of the
    teacher's, and that count."""
    linears = [teacher.get_submodule(name) for name in default_targets(teacher)]
    dense = sum(p.numel() for m in linears for p in m.parameters())
    rest = layer_parameters(teacher) - dense
    bound = min(max_saving_rank(m.out_features, m.in_features) for m in linears)
    goal = fraction * layer_parameters(teacher)

    def size(rank: int) -> int:
        return rest + sum(low_rank_parameters(m.out_features, m.in_features, rank, m.bias is not None)
                          for m in linears)

    rank = min(range(1, bound + 1), key=lambda r: abs(size(r) - goal))
    return rank, size(rank)


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices, evenly spaced, first and last kept (Shleifer & Rush's
    ``LAYERS_TO_COPY``: 2 of 3 → [0, 2], 2 of 6 → [0, 5], 3 of 6 → [0, 2, 5]); 1 → [0]."""
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def peer_layers(teacher: MarianMTModel, goal: int) -> dict[str, list[int]]:
    """The kept encoder and decoder layers of the layer-dropping student whose layer parameters
    are closest to ``goal`` (ties: more encoder layers, as the distilled Marian students keep)."""
    per_layer = {side: [sum(p.numel() for p in layer.parameters()) for layer in getattr(teacher.model, side).layers]
                 for side in ("encoder", "decoder")}
    n_enc, n_dec = len(per_layer["encoder"]), len(per_layer["decoder"])
    options = []
    for e in range(1, n_enc + 1):
        for d in range(1, n_dec + 1):
            if (e, d) == (n_enc, n_dec):
                continue
            keep = {"encoder": spread(n_enc, e), "decoder": spread(n_dec, d)}
            count = sum(per_layer[side][i] for side, kept in keep.items() for i in kept)
            options.append((abs(count - goal), -e, keep))
    if not options:
        raise BenchError("the teacher has one encoder and one decoder layer: no layer-dropping student exists")
    return min(options, key=lambda option: option[:2])[2]


def layer_drop_student(teacher: MarianMTModel, keep: dict[str, list[int]]) -> MarianMTModel:
    """A MarianMT with only the ``keep`` layers of the teacher, every weight copied from it."""
    config = copy.deepcopy(teacher.config)
    config.encoder_layers, config.decoder_layers = len(keep["encoder"]), len(keep["decoder"])
    student = type(teacher)(config)
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        match = re.fullmatch(r"(model\.(encoder|decoder)\.layers\.)(\d+)(\..+)", key)
        state[key] = source[f"{match[1]}{keep[match[2]][int(match[3])]}{match[4]}" if match else key]
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


# ---------------------------------------------------------------------------------------------
# The tiny teacher of --quick


def tiny_teacher(pairs, folder: Path, seed: int) -> tuple[MarianMTModel, MarianTokenizer]:
    """A randomly initialized MarianMT (d_model 32, 2+2 layers) with a sentencepiece vocabulary
    trained on ``pairs``, laid out like OPUS-MT's (``</s>`` 0, ``<unk>`` 1, the pieces, ``<pad>`` last)."""
    from scripts.train_teacher import build_tokenizer  # the shipped teacher's recipe, at toy size

    tokenizer = build_tokenizer(pairs, folder, 202, seed, hard_vocab_limit=False)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = MarianConfig(vocab_size=len(tokenizer), **QUICK_TEACHER, pad_token_id=pad, eos_token_id=eos,
                          decoder_start_token_id=pad, forced_eos_token_id=eos)
    set_seed(seed)
    model = MarianMTModel(config)
    model.generation_config.bad_words_ids = [[pad]]
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Measuring


def translation_scores(model, tokenizer, sources, references, generate: dict) -> dict:
    """BLEU/chrF of greedy translations (``corpus_scores``, as the run's report computes them), plus
    the mean output length in target tokens and a few samples."""
    start = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, num_beams=1, **generate)
    seconds = time.perf_counter() - start
    lengths = [len(ids) for ids in tokenizer(text_target=hypotheses)["input_ids"]]
    return {**corpus_scores(hypotheses, references), "translate_seconds": round(seconds, 2),
            "mean_output_tokens": round(statistics.mean(lengths), 2),
            "samples": [{"source": s, "reference": r, "hypothesis": h}
                        for s, r, h in list(zip(sources, references, hypotheses))[:3]]}


def generation_speed(models: dict, tokenizer, sentences, generate: dict, repeats: int,
                     fixed_tokens: int) -> dict[str, dict]:
    """Per model, the median over rounds of (teacher seconds / model seconds) within a round for
    (1) greedy translation of ``sentences`` and (2) generating exactly ``fixed_tokens`` tokens for
    the first batch of them (the same decoder steps for every model: the cost of the architecture
    alone, whatever the model writes); also the median seconds. Every round visits every model in
    a rotating order, after a warm-up pass each."""
    batch = tokenizer(list(sentences[:generate["batch_size"]]), return_tensors="pt", padding=True, truncation=True,
                      max_length=generate["max_source_length"])

    @torch.inference_mode()
    def fixed(model):
        model.generate(**batch, num_beams=1, do_sample=False, min_new_tokens=fixed_tokens,
                       max_new_tokens=fixed_tokens)

    def greedy(model):
        translate(model, tokenizer, sentences, num_beams=1, **generate)

    names = list(models)
    for name in names:
        greedy(models[name])
        fixed(models[name])
    seconds = {(name, kind): [] for name in names for kind in ("greedy", "fixed")}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            for kind, call in (("greedy", greedy), ("fixed", fixed)):
                start = time.perf_counter()
                call(models[name])
                seconds[name, kind].append(time.perf_counter() - start)
    report = {}
    for name in names:
        report[name] = {}
        for kind, key in (("greedy", "speed_vs_teacher"), ("fixed", "fixed_length_speed_vs_teacher")):
            ratios = [t / s for t, s in zip(seconds[names[0], kind], seconds[name, kind])]
            report[name][key] = round(statistics.median(ratios), 3)
            report[name][f"{kind}_median_seconds"] = round(statistics.median(seconds[name, kind]), 3)
    return report


def recover(teacher, student, tokenizer, train_set, weights: dict, feature_layers: list[str], args) -> tuple:
    """Train ``student`` in place with the run's fixed budget; returns (student, seconds, history)."""
    # ``Distiller`` freezes the teacher in place; a student copied from it afterwards would start
    # partly frozen, so every student is made trainable here (the sinusoidal tables stay fixed).
    student.requires_grad_(True)
    epochs = math.ceil(args.steps / math.ceil(len(train_set) / args.batch_size))
    settings = DistillationSettings(Config(
        epoch=epochs, max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio, loss_weights=weights, seed=args.seed, progress=False, group_by_length=False))
    distiller = distill(teacher, student, tokenizer, train_set, None, settings, feature_layers)
    assert distiller.total_steps == args.steps, (distiller.total_steps, args.steps)
    return distiller.unwrapped_student.eval(), distiller.train_seconds, distiller.history


# ---------------------------------------------------------------------------------------------
# Report


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%"


def print_table(rows: list[dict], teacher: dict) -> None:
    print("| size | model | layer params (% teacher) | total params (% teacher) | BLEU | chrF "
          "| BLEU retention | greedy translation speed × teacher | fixed-length speed × teacher | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        retention = f"{row['bleu_retention']:.1f}%" if row["bleu_retention"] is not None else "n/a"
        train = f"{row['train_seconds']:.0f}" if row["train_seconds"] is not None else "—"
        layers = f"{row['layer_params']:,} ({percent(row['layer_params'], teacher['layer_params'])})"
        total = f"{row['params']:,} ({percent(row['params'], teacher['params'])})"
        print(f"| {row['size']} | {row['model']} | {layers} | {total} | {row['bleu']:.2f} | {row['chrf']:.2f} "
              f"| {retention} | {row['speed_vs_teacher']:.2f} | {row['fixed_length_speed_vs_teacher']:.2f} | {train} |")


def target_verdicts(rows: list[dict]) -> list[dict]:
    """Per size: retention of the paper's recipe against the target, and its BLEU against the peer's."""
    verdicts = []
    for size in dict.fromkeys(row["size"] for row in rows if row["kind"] != "teacher"):
        group = {row["kind"]: row for row in rows if row["size"] == size}
        recipe, peer = group["svd+ce+kd+feature"], group["layer-drop"]
        verdicts.append({
            "size": size, "layer_fraction": recipe["layer_fraction"], "recipe": recipe["model"],
            "retention": recipe["bleu_retention"],
            "retention_met": recipe["bleu_retention"] is not None and recipe["bleu_retention"] >= TARGET_RETENTION,
            "best_svd_retention": max((r["bleu_retention"] for k, r in group.items()
                                       if k.startswith("svd+") and r["bleu_retention"] is not None), default=None),
            "peer": peer["model"], "bleu_vs_peer": round(recipe["bleu"] - peer["bleu"], 2),
            "ahead_of_peer": recipe["bleu"] > peer["bleu"]})
    return verdicts


def print_verdicts(verdicts: list[dict]) -> None:
    print(f"\nTargets (reported, not asserted): at <= 50% of the layer parameters, >= {TARGET_RETENTION:.0f}% "
          f"of the teacher's BLEU after recovery, and ahead of the layer-dropping student.")
    for v in verdicts:
        applies = "" if v["layer_fraction"] <= 0.5 else " (above 50%: for reference)"
        if v["retention"] is None:
            retention = "n/a (teacher BLEU is 0)"
        elif v["retention_met"]:
            retention = f"{v['retention']:.1f}% (met)"
        else:
            retention = f"{v['retention']:.1f}% (NOT met, {TARGET_RETENTION - v['retention']:.1f} points short)"
        ahead = "ahead: met" if v["ahead_of_peer"] else "NOT ahead"
        print(f"- {v['size']}{applies}: {v['recipe']} keeps {retention}; vs {v['peer']}: "
              f"{v['bleu_vs_peer']:+.2f} BLEU ({ahead})")


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny random teacher built here (unless --teacher), a few steps and pairs (smoke test)")
    parser.add_argument("--teacher", help=f"teacher folder (default {FULL['teacher']}; --quick: a tiny random one)")
    parser.add_argument("--train", help=f"training pairs CSV (default {FULL['train']})")
    parser.add_argument("--eval", help=f"evaluation pairs CSV (default {FULL['eval']}; --quick: {QUICK['eval']})")
    parser.add_argument("--sizes", help="target fractions of the teacher's layer parameters (default 0.7,0.5)")
    parser.add_argument("--steps", type=int, help="optimizer steps per trained row (default 600; --quick 3)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default 32; --quick 8)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (default 3e-4)")
    parser.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warm-up share of the steps (0.06)")
    parser.add_argument("--train-pairs", type=int, help="use only the first N training pairs (default all)")
    parser.add_argument("--eval-pairs", type=int, help="use only the first N evaluation pairs (default all)")
    parser.add_argument("--max-length", type=int, help="source/target tokens kept in training (default 64)")
    parser.add_argument("--max-new-tokens", type=int, help="longest translation generated (default 128)")
    parser.add_argument("--speed-sentences", type=int, help="eval sentences translated per speed timing (256)")
    parser.add_argument("--speed-repeats", type=int, help="timed rounds of the speed comparison (default 5)")
    parser.add_argument("--fixed-tokens", type=int, help="tokens generated in the fixed-length timing (default 32)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default 2; --quick 1)")
    parser.add_argument("--seed", type=int, default=42, help="seed for data order, dropout and the quick teacher")
    parser.add_argument("--json", help="also write every number (and the settings) to this JSON file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("steps", "batch_size", "max_length", "max_new_tokens", "speed_sentences", "speed_repeats",
                 "fixed_tokens", "threads", "train_pairs", "eval_pairs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0 or not 0 <= args.warmup_ratio < 1:
        parser.error(f"--lr must be positive and --warmup-ratio in [0, 1), got {args.lr} and {args.warmup_ratio}")
    try:
        args.fractions = [float(f) for f in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated fractions such as 0.7,0.5, got {args.sizes!r}")
    if not all(0 < f < 1 for f in args.fractions):
        parser.error(f"--sizes must lie strictly between 0 and 1, got {args.sizes!r}")
    return args


def resolve(path: str) -> str:
    """A relative path is taken from the current folder if it exists there, else from the repository."""
    return path if Path(path).is_absolute() or Path(path).exists() else str(REPO / path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (BenchError, ConfigError, DataError, DecompositionError) as e:
        print(f"bench_quality.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    started = time.time()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")

    # Seed, threads
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    say = lambda *a: print(*a, flush=True)  # noqa: E731

    # Data
    config = Config(max_source_length=args.max_length, max_target_length=args.max_length)
    train_pairs = load_pairs(resolve(args.train), config, key="--train")
    eval_pairs = load_pairs(resolve(args.eval), config, key="--eval")
    if args.train_pairs:
        train_pairs = train_pairs.select(range(min(args.train_pairs, len(train_pairs))))
    if args.eval_pairs:
        eval_pairs = eval_pairs.select(range(min(args.eval_pairs, len(eval_pairs))))

    # Teacher
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as work:
        if args.teacher:
            folder = resolve(args.teacher)
            if not (Path(folder) / "model.safetensors").is_file():
                raise BenchError(f"--teacher: {args.teacher!r} has no model.safetensors; train it with "
                                 f"python -m scripts.train_teacher, or run with --quick for a tiny random teacher")
            teacher, tokenizer = load_pretrained(folder, "--teacher")
            info_file = Path(folder) / "training_info.json"
            teacher_info = json.loads(info_file.read_text()) if info_file.is_file() else None
        else:
            teacher, tokenizer = tiny_teacher(list(zip(train_pairs["source_text"], train_pairs["target_text"])),
                                              Path(work), args.seed)
            teacher_info = {"note": "tiny randomly initialized teacher (--quick)", **QUICK_TEACHER}
    positions = getattr(teacher.config, "max_position_embeddings", None) or 10**9
    config.max_source_length = config.max_target_length = min(args.max_length, positions)
    train_set = preprocess(train_pairs, tokenizer, config, default_data_preprocessor)
    sources, references = eval_pairs["source_text"], eval_pairs["target_text"]
    generate = {"batch_size": 64, "max_new_tokens": min(args.max_new_tokens, positions - 1),
                "max_source_length": config.max_source_length}
    t_layers, t_params = layer_parameters(teacher), count_parameters(teacher)
    say(f"teacher: d_model {teacher.config.d_model}, {teacher.config.encoder_layers}+{teacher.config.decoder_layers} "
        f"layers, vocab {teacher.config.vocab_size}; {t_params:,} params, of which {t_layers:,} "
        f"({percent(t_layers, t_params)}) in the encoder/decoder layers; {len(train_set):,} training pairs, "
        f"{len(sources):,} eval pairs; {args.steps} steps × batch {args.batch_size} per trained row; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows: list[dict] = []
    models: dict[str, torch.nn.Module] = {}

    def add_row(kind: str, size: str, fraction: float, label: str, model, seconds=None, history=None, **extra):
        scores = translation_scores(model, tokenizer, sources, references, generate)
        row = {"kind": kind, "size": size, "target_fraction": fraction, "model": label,
               "layer_params": layer_parameters(model), "params": count_parameters(model),
               "train_seconds": None if seconds is None else round(seconds, 1), **scores, **extra,
               "history": history or []}
        row["layer_fraction"] = round(row["layer_params"] / t_layers, 4)
        row["param_fraction"] = round(row["params"] / t_params, 4)
        rows.append(row)
        models[f"{size} {label}"] = model
        timing = f", trained {seconds:.0f}s" if seconds is not None else ""
        say(f"  {size} {label}: BLEU {row['bleu']:.2f}, chrF {row['chrf']:.2f}{timing}")
        return row

    # Evaluate the teacher
    teacher_row = add_row("teacher", "100%", 1.0, "teacher", teacher)

    # Decompose and recover, then the layer-dropping peer, at each size
    for fraction in args.fractions:
        rank, count = rank_for_fraction(teacher, fraction)
        size = f"~{100 * fraction:.0f}%"
        say(f"{size} of the layer parameters: rank {rank} → {count:,} layer params ({percent(count, t_layers)})")
        decomposed, ranks = build_student(teacher, [], rank)
        assert layer_parameters(decomposed) == count
        add_row("svd", size, fraction, f"SVD r={rank}, no training", decomposed, rank=rank)
        for name, weights in RECOVERY.items():
            student = copy.deepcopy(decomposed)
            features = list(ranks) if weights.get("feature") else []
            student, seconds, history = recover(teacher, student, tokenizer, train_set, weights, features, args)
            add_row(f"svd+{name.replace(' ', '')}", size, fraction, f"SVD r={rank} + {name}", student, seconds,
                    history, rank=rank, loss_weights=weights)
        keep = peer_layers(teacher, count)
        peer = layer_drop_student(teacher, keep)
        enc, dec = keep["encoder"], keep["decoder"]
        shape = f"layer-drop {len(enc)}+{len(dec)} (enc {','.join(map(str, enc))}; dec {','.join(map(str, dec))})"
        peer_count = layer_parameters(peer)
        say(f"{size} peer: {shape} → {peer_count:,} layer params ({percent(peer_count, t_layers)})")
        untrained = translation_scores(peer, tokenizer, sources, references, generate)  # for the JSON only
        peer, seconds, history = recover(teacher, peer, tokenizer, train_set, PEER_WEIGHTS, [], args)
        add_row("layer-drop", size, fraction, f"{shape} + ce + kd", peer, seconds, history, kept_layers=keep,
                loss_weights=PEER_WEIGHTS, untrained={k: untrained[k] for k in ("bleu", "chrf")})
    for row in rows:
        row["bleu_retention"] = round(100 * row["bleu"] / teacher_row["bleu"], 1) if teacher_row["bleu"] > 0 else None

    # Generation speed, every model side by side
    say(f"timing greedy translation of {min(args.speed_sentences, len(sources))} sentences and "
        f"{args.fixed_tokens} fixed-length tokens, {args.speed_repeats} rounds…")
    speed = generation_speed(models, tokenizer, sources[:args.speed_sentences], generate, args.speed_repeats,
                             args.fixed_tokens)
    for row, key in zip(rows, models):
        row.update(speed[key])

    # Report
    print()
    print_table(rows, teacher_row)
    verdicts = target_verdicts(rows)
    print_verdicts(verdicts)
    print("layer-drop students before training (copied layers only): "
          + "; ".join(f"{r['size']} BLEU {r['untrained']['bleu']:.2f}" for r in rows if r["kind"] == "layer-drop"))
    total = time.time() - started
    print(f"total {total / 60:.1f} min; sizes counted on the encoder/decoder layer parameters "
          f"({t_layers:,} of the teacher's {t_params:,})")

    if args.json:
        report = {
            "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + sys.argv[1:]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version()},
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "teacher": {"folder": args.teacher, "params": t_params, "layer_params": t_layers,
                        "training_info": teacher_info},
            "targets": {"retention_percent": TARGET_RETENTION, "verdicts": verdicts},
            "rows": rows, "total_seconds": round(total, 1),
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
