"""How much a distillation step costs compared with plain fine-tuning of the same factorized student,
at the shipped teacher's size.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_distill_step            # ~2 min
    OMP_NUM_THREADS=1 python -m benchmarks.bench_distill_step --quick    # a few steps (smoke test)

The teacher is the shipped one (models/teacher-en-de: MarianMT d_model 128, 3+3 layers, vocabulary
8,000); the student is its copy with every layer linear and the shared embedding factorized to half
its parameters (decompose_layers ["*"], the ranks the 50% runs of bench_recovery.py allocated, read from
``--ranks-from``: shared embedding 85, layer linears 8-85; plain SVD factors, since the step's cost
depends on the shapes, not on the values). The batch is 32 pairs of the shipped training data of
median length, padded. Each round times, alternating, in one process:

  (a) plain       the tool's fine-tuning step, ``Distiller._loss_step`` with cross-entropy alone: the
                  student's forward, its logits at real target positions only, backward, fused AdamW
  (h) by hand     the same written the usual way: the model's logits at every position,
                  ``F.cross_entropy``, torch's AdamW defaults (what the tool's step did before; not
                  the base of the ratios)
  (b) cached kd   ``Distiller._loss_step`` with ce + kd from the teacher's cached top-16 logits (kd_top_k 16)
  (c) online kd   ce + kd against the teacher's full output, the teacher run in the step
  (d) paper       ce + kd + feature (every decomposed layer), the teacher run in the step: the default
  (e) everything  (d) with the hidden and attention terms too (both models on eager attention)
  (t) teacher     the teacher's forward alone, without autograd (what (c)–(e) pay and (a), (b) do not)

Each is timed after warm-up; the table gives the median (and the fastest) step, the ratio to (a),
and the activations autograd keeps for the backward pass (measured once, outside the timing). The
target is a distillation step ≤ 1.3 × (a). The cache (b) reads is computed once per pair before training: its cost
per batch of 32, measured over the same pairs, is printed below the table, with the cost of one
epoch of (b) including it. ``resource.getrusage`` gives the peak resident memory of the process.
Gradient clipping and the learning-rate schedule are left out of every step. Timings on a shared
machine are noisy: compare ratios from the same run, not absolute times.

``--profile`` also runs (a) under ``torch.profiler`` and prints where its time goes: the operations
on a tensor with the vocabulary as a dimension (the output projection's products, its bias and the
cross-entropy over the vocabulary), the attention kernels, the other matrix products, dropout's
random masks, the optimizer, and the rest (the profiler's own overhead weighs most on the rest:
read the shares, not the sum).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

import datasets  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import DataCollatorForSeq2Seq  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from compress_model import Config  # noqa: E402
from mdcompress.data import read_pairs  # noqa: E402
from benchmarks import write_json  # noqa: E402
from benchmarks.bench_recovery import first_run_of  # noqa: E402
from decomposition import build_student  # noqa: E402
from distillation.distillation_loss import IGNORE_INDEX  # noqa: E402
from distillation.knowledge_distillation import DistillationSettings, Distiller  # noqa: E402
from distillation.teacher_cache import build_teacher_cache  # noqa: E402
from matrix_decomposition import count_parameters, load_pretrained  # noqa: E402
from mdcompress.teacher_forcing import decoder_inputs  # noqa: E402

TARGET_RATIO = 1.3
BATCH = 32
TOP_K = 16
TEACHER = REPO / "models" / "teacher-en-de"
TRAIN = REPO / "data" / "tatoeba_en_de" / "train.csv"
RANKS = REPO / "benchmarks" / "results" / "recovery_50_4_epochs.json"


def median_length_pairs(tokenizer, count: int) -> datasets.Dataset:
    """``count`` tokenized training pairs around the median length (as a length-grouped batch holds)."""
    pairs = read_pairs(TRAIN)[:4000]
    pairs.sort(key=lambda p: len(p[0]) + len(p[1]))
    middle = len(pairs) // 2
    chosen = pairs[middle - count // 2: middle - count // 2 + count]
    encoded = tokenizer([s for s, _ in chosen], text_target=[t for _, t in chosen], truncation=True, max_length=128)
    return datasets.Dataset.from_dict(dict(encoded))


class HandWrittenStep:
    """(h) fine-tuning the student on the references as one writes it by hand."""

    def __init__(self, student, learning_rate: float):
        self.student = student.train()
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate)
        self.models = (student,)

    def __call__(self, batch) -> None:
        labels = batch["labels"]
        logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=decoder_inputs(self.student, labels)).logits  # (B, T, V)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DistillStep:
    """(a), (b)–(e): one ``Distiller._loss_step`` with its hooks in place (entered once, as ``train`` does)."""

    def __init__(self, teacher, student, tokenizer, pairs, weights: dict[str, float], feature_layers: list[str],
                 learning_rate: float, kd_top_k: int = 0, cache_dir: str | None = None):
        settings = DistillationSettings(
            Config(loss_weights=weights, learning_rate=learning_rate, batch_size=BATCH, progress=False,
                   group_by_length=False, kd_top_k=kd_top_k), cache_dir=cache_dir)
        self.distiller = d = Distiller(teacher, student.train(), tokenizer, pairs, None, settings, feature_layers)
        self.models = (d.teacher, d.unwrapped_student)
        self._hooks = contextlib.ExitStack()
        self.teacher_features, self.student_features = self._hooks.enter_context(d._hooks())

    def __call__(self, batch) -> None:
        d = self.distiller
        loss, _ = d._loss_step(batch, self.teacher_features, self.student_features)
        d.accelerator.backward(loss)
        d.optimizer.step()
        d.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self._hooks.close()


class TeacherForward:
    """(t) the teacher's forward pass alone, as ``_loss_step`` runs it."""

    def __init__(self, teacher):
        self.teacher = teacher.eval()
        self.models = (teacher,)

    @torch.no_grad()
    def __call__(self, batch) -> None:
        labels = batch["labels"]
        self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_inputs(self.teacher, labels))


def saved_activation_bytes(step, batch) -> int:
    """Bytes of the tensors autograd saves for backward during one step (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for model in step.models for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(batch)
    return sum(seen.values())


PARTS = ("vocabulary-wide (output projection, cross-entropy)", "attention", "other matrix products",
         "dropout masks", "optimizer", "the rest")


def profile_shares(step, batch, steps: int, vocab_size: int) -> dict[str, float]:
    """The share of the self CPU time of ``steps`` calls of ``step`` in each of ``PARTS``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step(batch)
    totals = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        name = event.key
        if any(vocab_size in shape for shape in event.input_shapes if isinstance(shape, (list, tuple))):
            part = PARTS[0]
        elif "scaled_dot_product" in name:
            part = PARTS[1]
        elif name in ("aten::mm", "aten::addmm", "aten::bmm"):
            part = PARTS[2]
        elif "bernoulli" in name:
            part = PARTS[3]
        elif "adamw" in name.lower():
            part = PARTS[4]
        else:
            part = PARTS[5]
        totals[part] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {part: value / whole for part, value in totals.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps (a smoke test)")
    parser.add_argument("--steps", type=int, help="timed steps per setup (default 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps per setup first (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--profile", action="store_true", help="also print where (a)'s time goes (torch.profiler)")
    parser.add_argument("--ranks-from", default=str(RANKS.relative_to(REPO)), metavar="JSON",
                        help="a bench_recovery.py --json whose first run's ranks the student takes "
                             "(default: %(default)s, the 50%% allocation)")
    parser.add_argument("--json", help="also write every number of the report here")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 20)
    warmup = (1 if args.quick else 3) if args.warmup is None else args.warmup
    if steps < 1 or warmup < 0 or args.threads < 1:
        parser.error(f"--steps and --threads must be at least 1 and --warmup at least 0, got "
                     f"{steps}, {args.threads} and {warmup}")

    # Set up
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, tokenizer = load_pretrained(str(TEACHER), "teacher_model_path")
    path = Path(args.ranks_from) if Path(args.ranks_from).exists() else REPO / args.ranks_from
    _, first_run = first_run_of(path, parser.error, "bench_recovery.py")
    try:
        allocated = {name: int(rank) for name, rank in first_run["ranks"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        parser.error(f"--ranks-from {args.ranks_from}: no ranks in its first run ({type(e).__name__}: {e})")
    student, ranks = build_student(teacher, list(allocated), allocated, "exact")
    layer_linears = [name for name in ranks if name != "model.shared"]
    pairs = median_length_pairs(tokenizer, BATCH * (1 if args.quick else 20))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    eager_teacher = copy.deepcopy(teacher)  # (e) switches its models to eager attention; the others keep the default
    with tempfile.TemporaryDirectory() as cache:
        setups = {
            "(a) plain": ("ce", DistillStep(teacher, copy.deepcopy(student), tokenizer, pairs, {"ce": 1.0}, [],
                                            args.lr)),
            "(h) by hand": ("ce", HandWrittenStep(copy.deepcopy(student), args.lr)),
            "(b) cached kd": (f"ce+kd (cached top-{TOP_K})",
                            DistillStep(teacher, copy.deepcopy(student), tokenizer, pairs, {"ce": 1.0, "kd": 1.0}, [],
                                        args.lr, kd_top_k=TOP_K, cache_dir=cache)),
            "(c) online kd": ("ce+kd", DistillStep(teacher, copy.deepcopy(student), tokenizer, pairs,
                                                   {"ce": 1.0, "kd": 1.0}, [], args.lr)),
            "(d) paper": ("ce+kd+feature (the default)", DistillStep(teacher, copy.deepcopy(student), tokenizer, pairs,
                                                       {"ce": 1.0, "kd": 1.0, "feature": 1.0}, layer_linears, args.lr)),
            "(e) everything": ("ce+kd+feature+hidden+attention",
                               DistillStep(eager_teacher, copy.deepcopy(student), tokenizer, pairs,
                                           {"ce": 1.0, "kd": 1.0, "feature": 1.0, "hidden": 1.0, "attention": 1.0},
                                           layer_linears, args.lr)),
            "(t) teacher": ("forward only, no autograd", TeacherForward(teacher)),
        }
        # one batch of 32 pairs for every setup: the first of (b)'s loader, which carries the cache's row ids
        batch = collator([{**pairs[i], "kd_row": i} for i in range(BATCH)])
        rss_before = peak_rss_mb()

        # Time, alternating the setups (rotating their order every round)
        names = list(setups)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(warmup + steps):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                setups[name][1](batch)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
        saved = {name: saved_activation_bytes(step, batch) for name, (_, step) in setups.items()}
        shares = profile_shares(setups["(a) plain"][1], batch, steps, teacher.config.vocab_size) if args.profile else {}
        for _, step in setups.values():
            if isinstance(step, DistillStep):
                step.close()
        # the cache's one-off cost: computed again, from scratch, over the same pairs
        started = time.perf_counter()
        build_teacher_cache(teacher, pairs, collator, decoder_inputs, TOP_K, 2.0, Path(cache) / "again",
                            progress=False)
        cache_per_batch = (time.perf_counter() - started) / (len(pairs) / BATCH)

    # Report
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["(a) plain"]
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    print(f"shipped teacher (MarianMT d_model {teacher.config.d_model}, {teacher.config.encoder_layers}+"
          f"{teacher.config.decoder_layers} layers, vocabulary {teacher.config.vocab_size}); {len(ranks)} matrices "
          f"factorized: {t_params:,} → {s_params:,} params ({100 * s_params / t_params:.1f}%)")
    real = int((batch["labels"] != IGNORE_INDEX).sum())
    print(f"batch {BATCH} pairs, {tuple(batch['input_ids'].shape)} source and {tuple(batch['labels'].shape)} target "
          f"tokens ({real} real target tokens); {steps} timed steps after {warmup} warm-up, alternating; "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| step | loss terms | median ms | min ms | × plain | saved activations MB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (terms, _) in setups.items():
        print(f"| {name} | {terms} | {1000 * median[name]:.1f} | {1000 * min(times[name]):.1f} | "
              f"{median[name] / base:.2f} | {saved[name] / 2**20:.1f} |")
    ratio = median["(b) cached kd"] / base
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"\ndistillation step with kd_top_k {TOP_K} / plain step = {ratio:.2f} (target ≤ {TARGET_RATIO}: {verdict}); "
          f"the default recipe (d): {median['(d) paper'] / base:.2f}")
    print(f"the cache of the teacher's top-{TOP_K}: {1000 * cache_per_batch:.1f} ms per batch of {BATCH}, once per "
          f"pair = {cache_per_batch / base:.2f} × a plain step; one epoch of (b) with it costs "
          f"{(median['(b) cached kd'] + cache_per_batch) / base:.2f} × plain, the paper's (d) "
          f"{median['(d) paper'] / base:.2f} ×")
    if shares:
        print(f"\nwhere (a)'s time goes ({steps} steps under torch.profiler, self CPU time):\n")
        print("| part of a plain step | share |")
        print("|---|---:|")
        for part, share in shares.items():
            print(f"| {part} | {100 * share:.0f}% |")
        print()
    print(f"peak RSS {peak_rss_mb():.0f} MB ({rss_before:.0f} MB after setting up the models, before any step)")
    if args.json:
        write_json(args.json, {
            "teacher_params": t_params, "student_params": s_params, "factorized": len(ranks), "steps": steps,
            "warmup": warmup, "threads": torch.get_num_threads(), "batch_pairs": BATCH, "real_target_tokens": real,
            "rows": [{"step": name, "terms": terms, "median_ms": 1000 * median[name], "min_ms": 1000 * min(times[name]),
                      "vs_plain": median[name] / base, "saved_activations_mb": saved[name] / 2**20}
                     for name, (terms, _) in setups.items()],
            "kd_top_k": TOP_K, "cached_kd_vs_plain": ratio, "cache_ms_per_batch": 1000 * cache_per_batch,
            "profile_shares": shares, "peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": rss_before})
    return 0


if __name__ == "__main__":
    sys.exit(main())
