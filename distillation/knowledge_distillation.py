"""The recovery loop: a frozen teacher, a factorized student learning to imitate it.

Per step the teacher runs without autograd; the student's loss combines
  ce         cross-entropy on the reference translations,
  kd         KL to the teacher's temperature-softened output distribution,
  feature    MSE between the outputs of the ``feature_layers`` (captured with forward hooks),
  hidden     MSE between the encoder and decoder hidden states after every layer,
  attention  MSE between the attention probabilities (needs the eager attention implementation),
each weighted by ``loss_weights``. Accelerate provides device placement, gradient accumulation,
mixed precision and data parallelism (``torchrun`` / ``accelerate launch``). Batches hold pairs
of similar length (``LengthGroupedSampler``) when ``group_by_length`` is set.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, get_linear_schedule_with_warmup

from distillation.distillation_loss import (
    IGNORE_INDEX,
    attention_loss,
    cross_entropy_loss,
    mean_feature_loss,
    output_distillation_loss,
    top_k_distillation_loss,
    weighted_sum,
)
from mdcompress.errors import UserError
from mdcompress.files import atomic_folder, chmod_as_umask, write_text_atomic
from mdcompress.progress import progress_bar
from mdcompress.config import LOSS_TERMS, Config
from mdcompress.teacher_forcing import capture_outputs, decoder_inputs, source_positioned, teacher_forced
from distillation.teacher_cache import build_teacher_cache

CURVE_POINTS = 200  # points of the recorded training curve (``Distiller.curve``)
# eval_steps 0 evaluates once per epoch: a run of HELD_OUT_MIN_STEPS steps or more also evaluates every
# 1/HELD_OUT_POINTS of it, for the held-out curve (``Distiller.held_out``); evaluating changes no weight
HELD_OUT_POINTS = 8
HELD_OUT_MIN_STEPS = 160
# what _save_checkpoint writes (its temporaries named by mdcompress.files)
CHECKPOINT_ENTRIES = ("latest", ".latest.tmp-*", "step-*", ".step-*.tmp-*", ".step-*.old-*")


@dataclass(frozen=True)
class DistillationSettings:
    """How the student is trained: the run's ``Config`` (its training keys: epoch, batch_size,
    loss_weights, …; ``mdcompress.config`` gives their defaults and meaning) and where this run's
    files go."""

    config: Config
    checkpoint_dir: str | None = None  # where a checkpoint goes every config.checkpoint_steps (None: none written)
    resume: bool = False  # continue from the latest checkpoint in checkpoint_dir
    cache_dir: str | None = None  # where the teacher's top-k logits (kd_top_k) are kept

    @property
    def checkpoint_steps(self) -> int:
        """Optimizer steps between checkpoints; 0: none written."""
        return self.config.checkpoint_steps if self.checkpoint_dir else 0


def distributed_on_cpu() -> bool:
    """Several processes (torchrun / accelerate launch) and no GPU: Accelerate then needs
    ``cpu=True`` to join them with the gloo backend instead of running each alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def check_gpus_for_processes() -> None:
    """Several processes on one machine with GPUs take one GPU each (NCCL joins one device per
    process): more processes than GPUs are refused in one line, before Accelerate fails inside a
    barrier with "invalid device ordinal" (seen with torchrun --nproc_per_node 2 on one H200)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if processes > 1 and torch.cuda.is_available() and processes > (gpus := torch.cuda.device_count()):
        raise UserError(f"{processes} processes on this machine (torchrun --nproc_per_node {processes}) but "
                        f"{gpus} GPU{'s' if gpus != 1 else ''}: start one process per GPU (--nproc_per_node "
                        f"{gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPUs")


def token_lengths(dataset) -> np.ndarray:
    """Source + target tokens of every example of a tokenized ``datasets.Dataset``, read from its
    Arrow columns a chunk at a time (no Python list per example)."""
    chunks = [pc.add(pc.list_value_length(table["input_ids"]), pc.list_value_length(table["labels"])).to_numpy()
              for table in dataset.with_format("arrow").iter(batch_size=100_000)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


class LengthGroupedSampler(Sampler[int]):
    """A random order in which every ``batch_size`` consecutive examples have similar lengths, so
    padded batches waste little: a permutation seeded by (seed, epoch) is cut into mega-batches of
    ``mega_batches × batch_size`` examples, each sorted by length and cut into batches, and the
    batches are shuffled (a last, smaller batch stays last). Used with a ``DataLoader`` of the same
    ``batch_size``; ``set_epoch`` gives each epoch its order, the same one on every process."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, mega_batches: int = 50):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.mega = batch_size, seed, mega_batches * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()  # (N,)
        mega_batch = np.arange(len(order)) // self.mega
        order = order[np.lexsort((-self.lengths[order], mega_batch))]  # longest first in each mega-batch (stable)
        # mega-batches hold whole batches, so only the very last batch can be smaller: it stays last
        whole = len(order) // self.batch_size * self.batch_size
        batches = order[:whole].reshape(-1, self.batch_size)  # (batches, batch_size)
        shuffled = batches[torch.randperm(len(batches), generator=generator).numpy()]
        for i in np.concatenate([shuffled.reshape(-1), order[whole:]]):  # index arrays, no Python object per pair
            yield int(i)


DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "activation_dropout")


def set_dropout_(model: nn.Module, p: float) -> None:
    """Every dropout probability in ``model`` set to ``p``: the ``nn.Dropout`` modules (T5) and the
    float attributes Hugging Face layers pass to ``F.dropout`` (Marian, BART, mBART, M2M100: hidden
    states, attention weights, activations). The model's config is left as it is."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)


class RealTargetPositions:
    """While ``active(mask)`` holds a (B, T) mask of real target positions, forward pre-hooks hand the
    output projection of each model only the decoder states at those positions, (B, T, H) → (1, N, H).
    The vocabulary-wide projection, the logits and the losses over them (the costliest part of a step at
    a small model's size) then skip the padding, which costs there as much as a real token; the logits
    come out (1, N, V), the real positions in order. Outside ``active`` the hooks change nothing, so
    evaluation and generation see the usual (B, T, V). Made by ``real_target_positions``."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def select(self, _module, args):
        if self.mask is None or args[0].shape[:2] != self.mask.shape:
            return None
        return (args[0][self.mask].unsqueeze(0), *args[1:])  # (1, N, H)

    @contextmanager
    def active(self, mask: torch.Tensor):
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None


@contextmanager
def real_target_positions(models, skip=()):
    """A ``RealTargetPositions`` hooked on the output projections of ``models``; its hooks are removed
    on exit. None (nothing hooked) for a model without an output projection, or when ``skip`` names it
    (a feature layer, whose captured output must keep its (B, T) layout)."""
    heads = [model.get_output_embeddings() for model in models]
    names = {{module: name for name, module in model.named_modules()}.get(head) for model, head in zip(models, heads)}
    if not all(isinstance(head, nn.Module) for head in heads) or names & set(skip):
        yield None
        return
    positions = RealTargetPositions()
    handles = [head.register_forward_pre_hook(positions.select) for head in heads]
    try:
        yield positions
    finally:
        for handle in handles:
            handle.remove()


def uses_teacher(loss_weights) -> bool:
    """Whether any loss term on (weight non-zero) compares the student with the teacher: with
    cross-entropy alone the recovery is plain fine-tuning."""
    return any(loss_weights.get(term) for term in LOSS_TERMS if term != "ce")


class Distiller:
    """Set up (teacher, student, optimizer, data), one ``_loss_step``, one loop."""

    def __init__(self, teacher: nn.Module, student: nn.Module, tokenizer, train_dataset, eval_dataset,
                 settings: DistillationSettings, feature_layers: list[str]):
        self.settings, self.config = settings, settings.config
        config = settings.config
        self.weights = {k: float(v) for k, v in config.loss_weights.items() if v}
        self.feature_layers = list(feature_layers) if self.weights.get("feature") else []
        self.source_layers = source_positioned(teacher, self.feature_layers)  # the rest: target positions
        self.accelerator = Accelerator(cpu=distributed_on_cpu(), mixed_precision=config.mixed_precision,
                                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        set_seed(config.seed)
        if self.weights.get("attention"):  # attention probabilities are only returned by eager attention
            for model in (teacher, student):
                model.set_attn_implementation("eager")

        self.teacher = teacher.to(self.accelerator.device).eval().requires_grad_(False)
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        self.teacher_cache, self.teacher_cache_reused, self.teacher_cache_seconds = None, False, 0.0
        if config.kd_top_k and self.weights.get("kd"):  # the Config refuses it with a feature, hidden or attention term
            started = time.time()
            with self.accelerator.main_process_first():  # one process computes, the others read
                self.teacher_cache, self.teacher_cache_reused = build_teacher_cache(
                    self.teacher, train_dataset, collator, decoder_inputs, config.kd_top_k, config.temperature,
                    settings.cache_dir, progress=config.progress and self.accelerator.is_main_process)
            self.teacher_cache_seconds = time.time() - started
            train_dataset = train_dataset.add_column("kd_row", np.arange(len(train_dataset)))
        if config.group_by_length:
            sampler = LengthGroupedSampler(token_lengths(train_dataset), config.batch_size, seed=config.seed)
            train_loader = DataLoader(train_dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collator)
        else:
            train_loader = DataLoader(train_dataset, batch_size=config.batch_size, shuffle=True, collate_fn=collator)
        eval_loader = (DataLoader(eval_dataset, batch_size=config.batch_size, collate_fn=collator) if eval_dataset
                       else None)

        for module in student.modules():  # fixed sinusoidal tables, computed under no_grad: never trained
            if "Sinusoidal" in type(module).__name__:
                module.requires_grad_(False)
            if isinstance(getattr(module, "layerdrop", None), float):
                # LayerDrop (M2M100's default 0.05) would skip student layers at random, leaving the feature,
                # hidden and attention terms nothing to compare: off while distilling
                module.layerdrop = 0.0
        if config.dropout is not None:
            set_dropout_(student, config.dropout)
        decay, no_decay = [], []
        for name, param in student.named_parameters():
            if param.requires_grad:
                (decay if param.ndim > 1 else no_decay).append(param)
        # fused: one kernel over every parameter instead of a loop over them (on CPU 1.7 ms against 8 ms a
        # step for the shipped teacher's half-size student, about 5% of the step; the same update)
        fused = self.accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate, fused=fused)
        self.real_positions: RealTargetPositions | None = None  # set by ``train``: the logits of real positions only
        self.student, self.optimizer, self.train_loader = self.accelerator.prepare(student, optimizer, train_loader)
        self.eval_loader = self.accelerator.prepare(eval_loader) if eval_loader else None
        self.total_steps = math.ceil(len(self.train_loader) / config.gradient_accumulation_steps) * config.epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        # The prepared scheduler advances once per process at every optimizer step, so its length is
        # counted in those units (else, with N processes, the learning rate reaches 0 after 1/N of the run).
        n = self.accelerator.num_processes
        scheduler = get_linear_schedule_with_warmup(self.optimizer, int(config.warmup_ratio * self.total_steps) * n,
                                                    self.total_steps * n)
        self.scheduler = self.accelerator.prepare(scheduler)
        self.history: list[dict] = []
        # the loss terms averaged over every ``curve_every`` steps, with the seconds trained so far: at
        # most about CURVE_POINTS points, for the training-curve picture
        self.curve: list[dict] = []
        self.curve_every = max(1, math.ceil(self.total_steps / CURVE_POINTS))
        self._curve_sums: dict[str, float] = {}  # the terms summed over the steps since the curve's last point
        # the held-out cross-entropy between the per-epoch evaluations (eval_steps 0 only)
        self.held_out: list[dict] = []
        self.held_out_every = math.ceil(self.total_steps / HELD_OUT_POINTS) \
            if not config.eval_steps and self.total_steps >= HELD_OUT_MIN_STEPS and HELD_OUT_POINTS else 0
        # what training went through, repeats counted: pairs and their real (non-padded) tokens
        self.trained = {"pairs": 0, "source_tokens": 0, "target_tokens": 0}

    @property
    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def _loss_step(self, batch, teacher_features, student_features) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of one batch and each of its terms (detached)."""
        w = self.weights
        labels = batch["labels"]  # (B, T)
        target_mask = labels != IGNORE_INDEX  # (B, T)
        source_mask = batch["attention_mask"].bool()  # (B, S)
        inputs = {
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "decoder_input_ids": decoder_inputs(self.unwrapped_student, labels),
            "decoder_attention_mask": batch.get("decoder_attention_mask"),
            "output_hidden_states": bool(w.get("hidden")), "output_attentions": bool(w.get("attention")),
        }
        online = ("feature", "hidden", "attention") + (() if self.teacher_cache else ("kd",))
        need_teacher = any(w.get(k) for k in online)
        positions = self.real_positions
        with positions.active(target_mask) if positions is not None else nullcontext():
            if need_teacher:
                with torch.no_grad():
                    teacher_out = self.teacher(**inputs)
            student_out = self.student(**inputs)
        # the logits (1, N, V) of the N real positions, or (B, T, V) if the projection's input was not
        # (B, T, H) (the two coincide for one unpadded pair)
        real = student_out.logits.shape[:2] == (1, int(target_mask.sum()))
        out_labels = labels[target_mask].unsqueeze(0) if real else labels  # laid out like the logits
        out_mask = out_labels != IGNORE_INDEX

        terms = {"ce": cross_entropy_loss(student_out.logits, out_labels, self.config.label_smoothing)}
        if w.get("kd") and self.teacher_cache:
            cached = self.teacher_cache.lookup(batch["kd_row"], labels)  # (B, T, k) ×2, (B, T)
            top_ids, top_logits, log_norm = (t[target_mask].unsqueeze(0) for t in cached) if real else cached
            terms["kd"] = top_k_distillation_loss(student_out.logits, top_ids, top_logits, log_norm, out_mask,
                                                  self.config.temperature)
        elif w.get("kd"):
            # the same layout as the student's: both projections are hooked, or neither
            terms["kd"] = output_distillation_loss(student_out.logits, teacher_out.logits, out_mask,
                                                   self.config.temperature)
        if self.feature_layers:
            masks = [source_mask if n in self.source_layers else target_mask for n in self.feature_layers]
            terms["feature"] = mean_feature_loss([student_features[n] for n in self.feature_layers],
                                                 [teacher_features[n] for n in self.feature_layers], masks)
        if w.get("hidden"):  # index 0 is the embedding output: not a layer
            enc_s, enc_t = student_out.encoder_hidden_states[1:], teacher_out.encoder_hidden_states[1:]
            dec_s, dec_t = student_out.decoder_hidden_states[1:], teacher_out.decoder_hidden_states[1:]
            terms["hidden"] = mean_feature_loss(enc_s + dec_s, enc_t + dec_t,
                                                [source_mask] * len(enc_s) + [target_mask] * len(dec_s))
        if w.get("attention"):
            s_maps = student_out.encoder_attentions + student_out.decoder_attentions + student_out.cross_attentions
            t_maps = teacher_out.encoder_attentions + teacher_out.decoder_attentions + teacher_out.cross_attentions
            n_enc, n_dec = len(student_out.encoder_attentions), len(student_out.decoder_attentions)
            terms["attention"] = attention_loss(s_maps, t_maps, [source_mask] * n_enc + [target_mask] * 2 * n_dec)
        loss = weighted_sum(terms, w)
        return loss, {k: v.detach() for k, v in terms.items()}

    @contextmanager
    def _hooks(self):
        """What ``_loss_step`` reads during ``train``: the outputs of the feature layers of both models
        (yielded) and, in ``real_positions``, the logits of real target positions only (the teacher's
        projection too: online kd compares the two models' logits position by position)."""
        with capture_outputs(self.teacher, self.feature_layers) as teacher_features, \
                capture_outputs(self.unwrapped_student, self.feature_layers) as student_features, \
                real_target_positions([self.unwrapped_student, self.teacher], self.feature_layers) as positions:
            self.real_positions = positions
            try:
                yield teacher_features, student_features
            finally:
                self.real_positions = None

    def train(self) -> list[dict]:
        """Run ``epoch`` passes (or ``max_steps`` optimizer steps); return the evaluation history."""
        config, acc = self.config, self.accelerator
        every = self.settings.checkpoint_steps  # optimizer steps between checkpoints (0: none)
        self.student.train()
        step, first_epoch, skip, elapsed, running = 0, 0, 0, 0.0, {}
        if self.settings.resume:
            step, first_epoch, skip, elapsed, running = self._load_checkpoint()
        # resumed from the checkpoint written when training ended (the run was stopped while evaluating or
        # saving): nothing is left to train
        finished = step >= self.total_steps
        start = time.time() - elapsed
        bar = progress_bar(total=self.total_steps, initial=step, unit="steps",
                           desc="distilling" if uses_teacher(self.weights) else "fine-tuning",
                           enabled=config.progress and acc.is_main_process)
        with self._hooks() as (teacher_features, student_features):
            for epoch in range(first_epoch, 0 if finished else config.epoch):
                self.train_loader.set_epoch(epoch)
                # on resume, the seeded epoch order is replayed and the batches already used are skipped
                loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
                batches_done, skip = skip, 0
                for batch in loader:
                    # dropout draws from a stream seeded by (seed, process, epoch, batch), so a resumed run
                    # repeats the uninterrupted one exactly, whatever else touched the global RNG meanwhile
                    torch.manual_seed(self._dropout_seed(epoch, batches_done))
                    batches_done += 1
                    self._count(batch)
                    with acc.accumulate(self.student):
                        loss, terms = self._loss_step(batch, teacher_features, student_features)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"the distillation loss became {loss.item()} at step {step + 1} "
                                f"({self._fmt(terms)}); {self._last_checkpoint_hint()}try a lower learning_rate")
                        acc.backward(loss)
                        if acc.sync_gradients and config.max_grad_norm:
                            acc.clip_grad_norm_(self.student.parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    terms["loss"] = loss.detach()
                    sums = self._curve_sums
                    for k, v in terms.items():  # exponential moving average for display
                        running[k] = v.item() if k not in running else 0.95 * running[k] + 0.05 * v.item()
                        sums[k] = sums.get(k, 0.0) + v.item()
                    sums["steps"] = sums.get("steps", 0) + 1
                    if step % self.curve_every == 0 or step >= self.total_steps:
                        n = sums.pop("steps")
                        self.curve.append({"step": step, "seconds": round(time.time() - start, 3),
                                           **{k: round(v / n, 4) for k, v in sums.items()}})
                        sums.clear()
                    bar.update(1)
                    bar.set_postfix_str(self._fmt(running), refresh=False)
                    if config.eval_steps and step % config.eval_steps == 0:
                        self._log_eval(epoch, step, running)
                    elif self.held_out_every and step % self.held_out_every == 0 and step < self.total_steps:
                        eval_ce = self.evaluate()
                        if eval_ce is not None:
                            self.held_out.append({"step": step, "eval_ce": round(eval_ce, 4)})
                    if every and step % every == 0 and step < self.total_steps:  # last: below
                        self._save_checkpoint(step, epoch, batches_done, time.time() - start, running)
                    if step >= self.total_steps:
                        break
                if not config.eval_steps or step % config.eval_steps:
                    self._log_eval(epoch, step, running)
                if step >= self.total_steps:
                    break
        if every and not finished:
            # the trained student kept too: a run stopped while evaluating or saving resumes without training
            self._save_checkpoint(step, epoch, batches_done, time.time() - start, running, finished=True)
        bar.close()
        self.train_seconds = time.time() - start
        self.trained = self._trained_by_all()
        self.student.eval()
        return self.history

    def _count(self, batch) -> None:
        self.trained["pairs"] += batch["input_ids"].shape[0]
        self.trained["source_tokens"] += int(batch["attention_mask"].sum())
        self.trained["target_tokens"] += int((batch["labels"] != IGNORE_INDEX).sum())

    def _trained_by_all(self) -> dict[str, int]:
        """``trained`` summed over the processes (a collective call: every process makes it)."""
        totals = self.accelerator.reduce(torch.tensor(list(self.trained.values()), device=self.accelerator.device),
                                         "sum")
        return dict(zip(self.trained, (int(v) for v in totals.cpu())))

    def _dropout_seed(self, epoch: int, batch: int) -> int:
        acc = self.accelerator
        micro_batch = epoch * len(self.train_loader) + batch
        return ((self.config.seed * 1_000_003 + micro_batch) * acc.num_processes + acc.process_index) % 2**63

    # -- checkpoints: <checkpoint_dir>/step-<N>/ written under a temporary name and renamed, then the
    # -- file <checkpoint_dir>/latest is replaced atomically; a crash at any point leaves a whole one.

    def _save_checkpoint(self, step: int, epoch: int, batches_done: int, elapsed: float, running: dict,
                         finished: bool = False) -> None:
        """``finished``: training has ended (the checkpoint written after the last step and its evaluation)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        trained = self._trained_by_all()
        if acc.is_main_process:
            root = Path(self.settings.checkpoint_dir)
            final = root / f"step-{step:08d}"
            with atomic_folder(final) as tmp:
                save_model(self.unwrapped_student, str(tmp / "student.safetensors"))
                chmod_as_umask(tmp / "student.safetensors")
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                           tmp / "trainer_state.pt")
                (tmp / "progress.json").write_text(json.dumps({
                    "step": step, "epoch": epoch, "batches_done": batches_done, "elapsed": elapsed,
                    "running": running, "history": self.history, "curve": self.curve, "held_out": self.held_out,
                    "curve_sums": self._curve_sums, "trained": trained, "finished": finished}))
            write_text_atomic(root / "latest", final.name)
            for old in root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def latest_checkpoint(self) -> Path | None:
        root = Path(self.settings.checkpoint_dir) if self.settings.checkpoint_dir else None
        if root is None or not (root / "latest").is_file():
            return None
        return root / (root / "latest").read_text().strip()

    def _last_checkpoint_hint(self) -> str:
        last = self.latest_checkpoint()
        return f"the last good checkpoint is kept in {last} (resume from it with --resume); " if last else ""

    def _load_checkpoint(self):
        path = self.latest_checkpoint()
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"no checkpoint to resume from in {self.settings.checkpoint_dir}")
        load_model(self.unwrapped_student, str(path / "student.safetensors"), strict=True)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        progress = json.loads((path / "progress.json").read_text())
        self.history = progress["history"]
        self.curve, self._curve_sums = progress.get("curve", []), progress.get("curve_sums", {})
        self.held_out = progress.get("held_out", [])
        if self.accelerator.is_main_process:  # the others start from 0: the sum over the processes stays right
            self.trained.update(progress.get("trained", {}))
        epoch, batches_done = progress["epoch"], progress["batches_done"]
        if batches_done >= len(self.train_loader):  # the checkpoint fell on the epoch's last batch
            epoch, batches_done = epoch + 1, 0
        return progress["step"], epoch, batches_done, progress["elapsed"], progress["running"]

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean teacher-forced cross-entropy of the student on the held-out pairs."""
        if self.eval_loader is None:
            return None
        was_training = self.student.training
        self.student.eval()
        total, count = torch.zeros(()), torch.zeros(())
        for batch in self.eval_loader:
            labels = batch["labels"]
            logits = teacher_forced(self.student, batch, self.unwrapped_student).logits  # (B, T, V)
            n = (labels != IGNORE_INDEX).sum()
            total += cross_entropy_loss(logits, labels).cpu() * n.cpu()
            count += n.cpu()
        total, count = self.accelerator.reduce(total, "sum"), self.accelerator.reduce(count, "sum")
        self.student.train(was_training)
        return (total / count.clamp(min=1)).item()

    def _log_eval(self, epoch: int, step: int, running: dict[str, float]) -> None:
        eval_ce = self.evaluate()
        entry = {"epoch": epoch + 1, "step": step, **{k: round(v, 4) for k, v in running.items()}}
        if eval_ce is not None:
            entry["eval_ce"] = round(eval_ce, 4)
        self.history.append(entry)
        if self.accelerator.is_main_process and self.config.progress:
            tqdm.write(f"step {step}/{self.total_steps}: " + self._fmt({k: v for k, v in entry.items()
                                                                        if k not in ("epoch", "step")}))

    @staticmethod
    def _fmt(values) -> str:
        return " ".join(f"{k} {float(v):.4f}" for k, v in values.items())
