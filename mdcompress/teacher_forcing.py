"""An encoder-decoder's teacher-forced forward pass on a tokenized batch, and what can be observed in it.

A batch holds ``input_ids`` and ``attention_mask`` (B, S) of the sources and the ``labels`` (B, T)
of the targets, padded with -100. Calibration, the rank sensitivity and the distillation loop all
run the model this way: the labels shifted right are the decoder's inputs, and forward hooks
record the outputs of named modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from distillation.distillation_loss import IGNORE_INDEX


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs for ``labels`` (B, T): the model's own ``prepare_decoder_input_ids_from_labels``
    (mBART's moves the language code to the front), else, for models without one (NLLB/M2M100), the
    labels shifted right behind ``decoder_start_token_id``, the -100 of padded positions made pad tokens."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    shifted = labels.new_full(labels.shape, model.config.decoder_start_token_id)  # (B, T)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill_(shifted == IGNORE_INDEX, model.config.pad_token_id)


def teacher_forced(model: nn.Module, batch: dict, unwrapped: nn.Module | None = None):
    """``model``'s forward pass on a tokenized batch, the labels shifted right as decoder inputs
    (by ``unwrapped``, the model inside ``model`` when that is an Accelerate/DDP wrapper)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                 decoder_input_ids=decoder_inputs(unwrapped or model, batch["labels"]))


@contextmanager
def capture_outputs(model: nn.Module, names: Iterable[str]):
    """Record the output of each named submodule on every forward pass into a dict; the hooks
    are removed on exit."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            def hook(_module, _inputs, output, name=name):
                outputs[name] = output[0] if isinstance(output, tuple) else output  # layers return (hidden, …)
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def source_positioned(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The modules among ``names`` whose outputs are indexed by source positions (the encoder's, and
    the key/value projections of the decoder's cross-attention, whatever the model calls them:
    Marian's ``encoder_attn.k_proj``, T5's ``EncDecAttention.k``) rather than target positions.
    Found by one forward pass of ``model`` with 3 source and 2 target tokens, recording how many
    positions each module's output has."""
    names = list(names)
    if not names:
        return set()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture_outputs(model, names) as outputs:
            model(input_ids=torch.ones(1, 3, dtype=torch.long, device=device),
                  decoder_input_ids=torch.ones(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        model.train(was_training)
    return {name for name in names if name in outputs and outputs[name].ndim >= 2 and outputs[name].shape[1] == 3}
