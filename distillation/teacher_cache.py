"""The teacher's output distribution, computed once: its ``k`` largest logits at every target position
of the training pairs and the log-normalizer of its softened distribution there, stored on disk and
reused by every epoch and every later run with the same teacher, pairs, ``k`` and temperature. The output distillation then costs no teacher forward pass per step
(``top_k_distillation_loss``); the teacher runs once per pair, in evaluation mode, in batches of
similar length.

On disk, one folder per (teacher, pairs, k, temperature), named by a hash of the four:
  ids.npy       (N_tokens, k)  int16/int32  token ids, the most probable first
  logits.npy    (N_tokens, k)  float16      their logits
  log_norm.npy  (N_tokens,)    float32      logsumexp(logits / temperature) over the whole vocabulary
  offsets.npy   (N_pairs + 1,) int64        pair i owns rows offsets[i]:offsets[i + 1], one per label token
written under a temporary name and renamed, so a half-written cache is never read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from distillation.distillation_loss import IGNORE_INDEX
from matrix_decomposition import weights_digest
from mdcompress.files import temporary_folder
from mdcompress.progress import progress_bar

VERSION = "2"  # part of the key: a change of what is stored invalidates older caches


class TeacherTopK:
    """A stored cache, memory-mapped; ``lookup`` gives a batch's (B, T, k) tensors."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.ids = np.load(self.folder / "ids.npy", mmap_mode="r")
        self.logits = np.load(self.folder / "logits.npy", mmap_mode="r")
        self.log_norm = np.load(self.folder / "log_norm.npy", mmap_mode="r")
        self.offsets = np.load(self.folder / "offsets.npy")
        self.k = self.ids.shape[1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lookup(self, rows: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What is stored for the pairs ``rows`` (B,), laid out like ``labels`` (B, T): (B, T, k) ids and
        logits, (B, T) log-normalizers; padded positions get zeros (they are masked out of the loss)."""
        batch, length = labels.shape
        ids = np.zeros((batch, length, self.k), dtype=np.int64)
        logits = np.zeros((batch, length, self.k), dtype=np.float32)
        log_norm = np.zeros((batch, length), dtype=np.float32)
        for b, row in enumerate(rows.tolist()):
            start, end = self.offsets[row], self.offsets[row + 1]
            ids[b, :end - start] = self.ids[start:end]
            logits[b, :end - start] = self.logits[start:end]
            log_norm[b, :end - start] = self.log_norm[start:end]
        return tuple(torch.from_numpy(a).to(labels.device) for a in (ids, logits, log_norm))


def cache_key(teacher: nn.Module, dataset, k: int, temperature: float) -> str:
    """A hash of the teacher's weights, the pairs' token ids, ``k`` and ``temperature``."""
    digest = weights_digest(teacher, f"{VERSION}:{k}:{float(temperature)!r}")
    for table in dataset.select_columns(["input_ids", "labels"]).with_format("arrow").iter(batch_size=100_000):
        for column in ("input_ids", "labels"):
            values = table[column]
            digest.update(pc.list_value_length(values).to_numpy().tobytes())
            digest.update(pc.list_flatten(values).to_numpy().tobytes())
    return digest.hexdigest()[:20]


def cache_folder(teacher: nn.Module, dataset, k: int, temperature: float, root: str | os.PathLike) -> Path:
    """Where the cache of ``teacher`` on ``dataset`` with ``k`` and ``temperature`` is, or will be, under ``root``."""
    return Path(root) / f"teacher-top{k}-{cache_key(teacher, dataset, k, temperature)}"


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, dataset, collator, decoder_inputs, k: int, temperature: float,
                        root: str | os.PathLike, batch_size: int = 64, progress: bool = True) -> tuple[TeacherTopK, bool]:
    """The cache of ``teacher`` on the tokenized pairs ``dataset`` (columns input_ids, attention_mask,
    labels), read from ``root`` when there, else computed (batches made by ``collator``, the decoder's
    inputs by ``decoder_inputs(model, labels)``, as in training) and written there. Returns it and
    whether it was reused."""
    vocab = teacher.get_output_embeddings().out_features
    if not 1 <= k <= vocab:
        raise ValueError(f"kd_top_k: {k} must be between 1 and the vocabulary size ({vocab})")
    folder = cache_folder(teacher, dataset, k, temperature, root)
    if folder.is_dir():
        return TeacherTopK(folder), True
    lengths = np.concatenate([pc.list_value_length(table["labels"]).to_numpy() for table in
                              dataset.select_columns(["labels"]).with_format("arrow").iter(batch_size=100_000)]
                             or [np.zeros(0, dtype=np.int64)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    Path(root).mkdir(parents=True, exist_ok=True)
    with temporary_folder(root, f".{folder.name}.tmp-") as tmp:
        ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", shape=(int(offsets[-1]), k),
                                        dtype=np.int16 if vocab <= 2**15 else np.int32)
        logits = np.lib.format.open_memmap(tmp / "logits.npy", mode="w+", shape=(int(offsets[-1]), k),
                                           dtype=np.float16)
        log_norm = np.lib.format.open_memmap(tmp / "log_norm.npy", mode="w+", shape=(int(offsets[-1]),),
                                             dtype=np.float32)
        was_training = teacher.training
        teacher.eval()
        device = next(teacher.parameters()).device
        order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
        columns = dataset.select_columns(["input_ids", "attention_mask", "labels"])
        for start in progress_bar(range(0, len(order), batch_size), desc=f"teacher top-{k}", enabled=progress,
                                  unit="batches", leave=False):
            rows = order[start:start + batch_size]
            batch = collator([columns[int(i)] for i in rows])
            labels = batch["labels"].to(device)
            out = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          decoder_input_ids=decoder_inputs(teacher, labels))
            top_logits, top_ids = out.logits.float().topk(k, dim=-1)  # (B, T, k)
            norms = (out.logits.float() / temperature).logsumexp(dim=-1)  # (B, T)
            for b, row in enumerate(rows):
                n = lengths[row]
                assert (labels[b, n:] == IGNORE_INDEX).all()  # labels are padded on the right
                ids[offsets[row]:offsets[row + 1]] = top_ids[b, :n].cpu().numpy()
                logits[offsets[row]:offsets[row + 1]] = top_logits[b, :n].cpu().numpy()
                log_norm[offsets[row]:offsets[row + 1]] = norms[b, :n].cpu().numpy()
        teacher.train(was_training)
        for array in (ids, logits, log_norm):
            array.flush()
        del ids, logits, log_norm
        np.save(tmp / "offsets.npy", offsets)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise  # else another run wrote the same cache meanwhile: theirs is as good, ours is removed
    return TeacherTopK(folder), False
