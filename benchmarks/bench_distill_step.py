"""How much a distillation step costs compared with plain fine-tuning of the same factorized student.

    OMP_NUM_THREADS=1 python benchmarks/bench_distill_step.py            # mid-size Marian, ~1–2 min
    OMP_NUM_THREADS=1 python benchmarks/bench_distill_step.py --quick    # tiny model, a few steps (smoke test)

A randomly initialised MarianMT (d_model 256, 3+3 layers, 4 heads, ffn 1024, vocabulary 8000) is the
teacher; the student is its copy with every encoder/decoder linear factorized at the one rank that
brings the whole model closest to half the teacher's parameters. On the same batch (32 pairs of
~16 source and target tokens, with padding) each round times, alternating, in one process:

  (a) plain      the student alone: forward, cross-entropy, backward, AdamW step
  (b) distill    ``Distiller._loss_step`` with ce + kd + feature (every decomposed layer), backward, AdamW step
  (c) distill+   the same with the hidden and attention terms too (both models on eager attention)
  (t) teacher    the teacher's forward alone, without autograd (the part of (b) that (a) does not pay)

Each is timed after warm-up; the table gives the median (and the fastest) step, the ratio to (a),
and the activations autograd keeps for the backward pass (measured once, outside the timing). The
target is (b) ≤ 1.6 × (a). ``resource.getrusage`` gives the peak resident memory of the process
(all setups together). Gradient clipping and the learning-rate schedule are left out of every step.
Timings on a shared machine are noisy: compare ratios from the same run, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import MarianConfig, MarianMTModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from compress_model import Config  # noqa: E402
from decomposition import build_student  # noqa: E402
from distillation.distillation_loss import IGNORE_INDEX, cross_entropy_loss  # noqa: E402
from distillation.knowledge_distillation import DistillationSettings, Distiller  # noqa: E402
from matrix_decomposition import count_parameters, default_targets, max_saving_rank  # noqa: E402
from teacher_forcing import capture_outputs  # noqa: E402

TARGET_RATIO = 1.6
FULL = dict(d_model=256, layers=3, heads=4, ffn=1024, vocab=8000, batch=32, length=16, steps=20, warmup=3)
QUICK = dict(d_model=32, layers=1, heads=2, ffn=64, vocab=500, batch=4, length=8, steps=3, warmup=1)


def make_teacher(size: dict) -> MarianMTModel:
    config = MarianConfig(
        vocab_size=size["vocab"], d_model=size["d_model"], encoder_layers=size["layers"],
        decoder_layers=size["layers"], encoder_attention_heads=size["heads"], decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"], max_position_embeddings=4 * size["length"],
        pad_token_id=size["vocab"] - 1, eos_token_id=0, decoder_start_token_id=size["vocab"] - 1)
    torch.manual_seed(0)
    return MarianMTModel(config).eval()


def half_size_rank(teacher: MarianMTModel, fraction: float = 0.5) -> int:
    """The single rank for every layer linear that brings the model closest to ``fraction`` of its size."""
    linears = [teacher.get_submodule(name) for name in default_targets(teacher)]
    total, in_linears = count_parameters(teacher), sum(m.weight.numel() for m in linears)
    bound = min(max_saving_rank(m.out_features, m.in_features) for m in linears)

    def size(rank: int) -> int:
        return total - in_linears + sum(rank * (m.in_features + m.out_features) for m in linears)

    return min(range(1, bound + 1), key=lambda rank: abs(size(rank) - fraction * total))


def make_batch(size: dict) -> dict[str, torch.Tensor]:
    """Random token ids with 60–100 % of each row real, the rest padding (-100 in the labels)."""
    g = torch.Generator().manual_seed(0)
    b, n, pad = size["batch"], size["length"], size["vocab"] - 1
    input_ids = torch.randint(1, pad, (b, n), generator=g)  # (B, S)
    labels = torch.randint(1, pad, (b, n), generator=g)  # (B, T)
    lengths = torch.randint(int(0.6 * n), n + 1, (2, b), generator=g)
    positions = torch.arange(n)
    attention_mask = (positions < lengths[0, :, None]).long()
    input_ids[attention_mask == 0] = pad
    labels[positions >= lengths[1, :, None]] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PlainStep:
    """(a) fine-tuning the student on the references, nothing else."""

    def __init__(self, student, learning_rate: float):
        self.student = student.train()
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate)
        self.models = (student,)

    def __call__(self, batch) -> None:
        labels = batch["labels"]
        logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=self.student.prepare_decoder_input_ids_from_labels(labels=labels)
                              ).logits  # (B, T, V)
        cross_entropy_loss(logits, labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DistillStep:
    """(b), (c): one ``Distiller._loss_step`` with its hooks in place (entered once, as ``train`` does)."""

    def __init__(self, teacher, student, weights: dict[str, float], feature_layers: list[str],
                 learning_rate: float):
        settings = DistillationSettings.from_config(Config(loss_weights=weights, learning_rate=learning_rate,
                                                           batch_size=1, progress=False, group_by_length=False))
        # The data loader is never used (batches come from make_batch), so neither tokenizer nor data are needed.
        self.distiller = d = Distiller(teacher, student.train(), None, [{}], None, settings, feature_layers)
        self.models = (d.teacher, d.unwrapped_student)
        self._hooks = contextlib.ExitStack()
        self.teacher_features = self._hooks.enter_context(capture_outputs(d.teacher, d.feature_layers))
        self.student_features = self._hooks.enter_context(capture_outputs(d.unwrapped_student, d.feature_layers))

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
                     decoder_input_ids=self.teacher.prepare_decoder_input_ids_from_labels(labels=labels))


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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and a few steps (a smoke test)")
    parser.add_argument("--steps", type=int, help="timed steps per setup (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps per setup first (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    steps = args.steps or size["steps"]
    warmup = size["warmup"] if args.warmup is None else args.warmup
    if steps < 1 or warmup < 0 or args.threads < 1:
        parser.error(f"--steps and --threads must be at least 1 and --warmup at least 0, got "
                     f"{steps}, {args.threads} and {warmup}")

    # Set up
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = make_teacher(size)
    rank = half_size_rank(teacher)
    student, ranks = build_student(teacher, [], rank)
    batch = make_batch(size)
    eager_teacher = copy.deepcopy(teacher)  # (c) switches its models to eager attention; (b) keeps the default
    setups = {
        "(a) plain": ("ce", PlainStep(copy.deepcopy(student), args.lr)),
        "(b) distill": ("ce+kd+feature", DistillStep(teacher, copy.deepcopy(student),
                                                     {"ce": 1.0, "kd": 1.0, "feature": 1.0}, list(ranks), args.lr)),
        "(c) distill+": ("ce+kd+feature+hidden+attention",
                         DistillStep(eager_teacher, copy.deepcopy(student),
                                     {"ce": 1.0, "kd": 1.0, "feature": 1.0, "hidden": 1.0, "attention": 1.0},
                                     list(ranks), args.lr)),
        "(t) teacher": ("forward only, no autograd", TeacherForward(teacher)),
    }
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
    for _, step in setups.values():
        if isinstance(step, DistillStep):
            step.close()

    # Report
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["(a) plain"]
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    print(f"MarianMT d_model {size['d_model']}, {size['layers']}+{size['layers']} layers, ffn {size['ffn']}, "
          f"vocab {size['vocab']}; {len(ranks)} linears at rank {rank}: {t_params:,} → {s_params:,} params "
          f"({100 * s_params / t_params:.1f}%)")
    print(f"batch {size['batch']} × {size['length']} source/target tokens; {steps} timed steps after {warmup} "
          f"warm-up, alternating; torch threads {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| step | loss terms | median ms | min ms | × plain | saved activations MB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (terms, _) in setups.items():
        print(f"| {name} | {terms} | {1000 * median[name]:.1f} | {1000 * min(times[name]):.1f} | "
              f"{median[name] / base:.2f} | {saved[name] / 2**20:.1f} |")
    ratio = median["(b) distill"] / base
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"\ndistillation step / plain step = {ratio:.2f} (target ≤ {TARGET_RATIO}: {verdict})")
    print(f"peak RSS {peak_rss_mb():.0f} MB ({rss_before:.0f} MB after setting up the models, before any step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
