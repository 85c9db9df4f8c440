"""Calibration statistics: what the activation-aware and Fisher-weighted inits fit each layer to,
measured on a few tokenized training pairs run teacher-forced through the model.

  calibration_batches  the first ``calibration_samples`` pairs, padded into batches;
  gather_input_grams   per linear, the Gram matrix XᵀX of its inputs; per token embedding, its
                       ``Weighting`` from the tokens' counts and the tied output projection's inputs
                       (``embedding_weighting``);
  gather_fisher_rows   per linear, the Fisher information of its output rows (Hsu et al., ICLR 2022),
                       which ``fisher_weighted`` folds into the Gram matrices.
``decomposition.decompose`` gathers them; ``matrix_decomposition.low_rank_factors`` fits to them,
and ``rank_allocation`` measures the sensitivity with the same batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from distillation.distillation_loss import IGNORE_INDEX
from matrix_decomposition import Weighting, encoder_and_decoder
from mdcompress.teacher_forcing import decoder_inputs, source_positioned, teacher_forced


def calibration_batches(train_dataset, tokenizer, samples: int, batch_size: int) -> list[dict]:
    """The first ``samples`` tokenized training pairs, padded into batches (labels padded with -100)."""
    subset = train_dataset.select(range(min(samples, len(train_dataset))))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return list(DataLoader(subset, batch_size=batch_size, collate_fn=collator))


@torch.no_grad()
def gather_input_grams(model: nn.Module, names: Sequence[str], batches) -> dict[str, torch.Tensor | Weighting]:
    """What the activation-aware init fits each named layer of ``model`` to, from teacher-forced
    forward passes over ``batches``, real positions only. For an ``nn.Linear``: XᵀX (d×d, float64)
    of the inputs X it receives (source positions for the encoder and the cross-attention
    key/value projections, target positions for the rest, ``source_positioned``). For a token
    embedding: its ``Weighting`` (``embedding_weighting``) from the count of each token it looks up
    and the Gram matrix of the inputs of the output projection tied to it, if any. Forward
    pre-hooks, removed on exit."""
    linears = [name for name in names if isinstance(model.get_submodule(name), nn.Linear)]
    tables = {name: model.get_submodule(name) for name in names if isinstance(model.get_submodule(name), nn.Embedding)}
    grams = {name: torch.zeros(model.get_submodule(name).in_features, model.get_submodule(name).in_features,
                               dtype=torch.float64) for name in linears}
    masks: dict[str, torch.Tensor] = {}  # the current batch's {"source": (B, S), "target": (B, T)}
    sources = source_positioned(model, linears)
    head = model.get_output_embeddings()
    tied = {name for name, table in tables.items() if isinstance(head, nn.Linear) and head.weight is table.weight}
    head_gram = torch.zeros(head.in_features, head.in_features, dtype=torch.float64) if tied else None
    positions = [0]  # target positions the output projection saw
    encoder, decoder = encoder_and_decoder(model)
    looks_up = {name: [side for side, stack in (("source", encoder), ("target", decoder))
                       if getattr(_input_embeddings(stack), "weight", None) is table.weight]
                for name, table in tables.items()}
    counts = {name: torch.zeros(table.num_embeddings, dtype=torch.float64) for name, table in tables.items()}

    def hook(_module, args, name):
        x = args[0][masks["source" if name in sources else "target"]]  # (B, L, d) → (N, d)
        grams[name] += (x.T.double() @ x.double()).cpu()  # (d, d)

    def head_hook(_module, args):
        x = args[0][masks["target"]]  # (N, d)
        head_gram.add_((x.T.double() @ x.double()).cpu())
        positions[0] += x.shape[0]

    handles = [model.get_submodule(name).register_forward_pre_hook(partial(hook, name=name)) for name in linears]
    if tied:
        handles.append(head.register_forward_pre_hook(head_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            masks.update(source=batch["attention_mask"].bool(), target=batch["labels"] != IGNORE_INDEX)
            teacher_forced(model, batch)
            ids = {"source": batch["input_ids"][masks["source"]],
                   "target": decoder_inputs(model, batch["labels"])[masks["target"]]}
            for name, sides in looks_up.items():
                for side in sides:
                    counts[name] += torch.bincount(ids[side].cpu(), minlength=counts[name].numel()).double()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name in tables:
        output_gram = head_gram / max(positions[0], 1) if name in tied else None
        grams[name] = embedding_weighting(counts[name], output_gram)
    return grams


def gather_fisher_rows(model: nn.Module, names: Sequence[str], batches) -> dict[str, torch.Tensor]:
    """For each named ``nn.Linear`` of ``model``, the Fisher information of its output rows (n,), float64:
    the squared gradient of the model's cross-entropy on each of ``batches`` (teacher-forced, summed over
    real target tokens), summed over the row's weights and the batches, as Fisher-weighted SVD (Hsu et al.,
    ICLR 2022) estimates it. A row whose errors change the loss more weighs more in the factorization
    (``fisher_weighted``). Only these weights take gradients, and their ``requires_grad`` is restored."""
    linears = {name: model.get_submodule(name) for name in names if isinstance(model.get_submodule(name), nn.Linear)}
    rows = {name: torch.zeros(linear.out_features, dtype=torch.float64) for name, linear in linears.items()}
    if not linears:
        return rows
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = [linear.weight for linear in linears.values()]
    was_training = model.training
    model.eval()
    device = weights[0].device
    try:
        for param in flags:
            param.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = teacher_forced(model, batch).logits  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
                for name, grad in zip(linears, torch.autograd.grad(loss, weights, allow_unused=True)):
                    if grad is not None:  # None: the forward pass never reached it (its rows stay 0)
                        rows[name] += grad.double().square().sum(dim=1).cpu()  # (n,)
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)
    return rows


def fisher_weighted(input_grams: Mapping[str, torch.Tensor | Weighting],
                    fisher_rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | Weighting]:
    """The activation init's statistics with each linear's rows weighted by √(its Fisher information),
    scaled to a mean of 1 and kept above 1e-3 of it (a row no calibration token moved still counts a
    little): the factors minimize ‖diag(√F)·(W − Ŵ)·L‖_F, with L·Lᵀ the inputs' Gram matrix. A token
    embedding keeps its own weighting."""
    weighted = dict(input_grams)
    for name, fisher in fisher_rows.items():
        rows = fisher.double().sqrt()
        mean = rows.mean()
        if not (torch.isfinite(mean) and mean > 0):  # no gradient reached the layer: the activation init alone
            continue
        rows = (rows / mean).clamp(min=1e-3)
        gram = input_grams.get(name)
        weighted[name] = Weighting(gram=gram.gram if isinstance(gram, Weighting) else gram, rows=rows)
    return weighted


def _input_embeddings(stack: nn.Module | None) -> nn.Module | None:
    try:
        return stack.get_input_embeddings() if stack is not None else None
    except (AttributeError, NotImplementedError):  # a stack without token embeddings of its own
        return None


def embedding_weighting(counts: torch.Tensor, output_gram: torch.Tensor | None = None) -> Weighting:
    """A token embedding's ``Weighting`` (see ``matrix_decomposition``): rows √(c_t + c̄) from the
    tokens' counts ``counts`` (V,), columns from ``output_gram`` (the tied output projection's input
    Gram matrix per position, d×d) plus mean(diag)·I, or none when no output projection is tied."""
    counts = counts.double()
    rows = (counts + counts.mean()).sqrt()
    if output_gram is None:
        return Weighting(rows=rows)
    gram = output_gram.double()
    return Weighting(gram=gram + gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype), rows=rows)
