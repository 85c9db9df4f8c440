"""Sequence-level knowledge distillation (Kim & Rush 2016): the student is trained on the teacher's
own translations of the training sources instead of the references (``sequence_level_kd``).

The translations are generated once and cached, so that a run started again (or resumed, or the
next model of a size sweep) reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn

from mdcompress.files import write_text_atomic
from mdcompress.translate import translate


def teacher_translations(teacher: nn.Module, tokenizer, sources: Sequence[str] | Sequence[Sequence[int]],
                         cache_dir: str | os.PathLike, teacher_path: str, **generate_kwargs
                         ) -> tuple[list[str], Path, bool]:
    """The teacher's translations of ``sources`` (the targets of sequence-level distillation, Kim &
    Rush 2016; token-id lists as ``data_preprocessor`` returns them, or sentences, see ``translate``),
    generated once and cached as JSONL ({"source", "target"} per line) in ``cache_dir`` under a hash
    of the teacher (path, config, weights), the sources and the generation settings; written
    atomically by the main process. Under torchrun / accelerate launch every process translates
    its share and all of them get the full list. Returns (targets, cache file, whether it was reused)."""
    sources = [s if isinstance(s, str) else [int(t) for t in s] for s in sources]
    settings = {k: v for k, v in generate_kwargs.items()  # batching and the progress bar change nothing
                if k not in ("batch_size", "progress", "desc")}
    generation_config = getattr(teacher, "generation_config", None)
    digest = hashlib.sha256(json.dumps({
        "teacher": teacher_path, "config": teacher.config.to_dict(), "generation": settings,
        "generation_config": generation_config.to_dict() if generation_config is not None else None,
    }, sort_keys=True, default=str).encode())
    for name, tensor in [*teacher.named_parameters(), *teacher.named_buffers()]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for source in sources:
        digest.update(json.dumps(source, ensure_ascii=False).encode() + b"\0")
    path = Path(cache_dir) / f"teacher-translations-{digest.hexdigest()[:20]}.jsonl"
    state = PartialState()
    cached = _read_translation_cache(path, sources)
    if state.num_processes > 1 and not all(gather_object([cached is not None])):
        cached = None  # every process must take the same branch: generation below is collective
    if cached is not None:
        return cached, path, True
    # each process translates its share (no process waits for another's hours of generation)
    shard = list(range(state.process_index, len(sources), state.num_processes))
    shard_targets = translate(teacher, tokenizer, [sources[i] for i in shard],
                              **{"desc": "teacher translations", **generate_kwargs})
    targets = [""] * len(sources)
    for i, target in gather_object(list(zip(shard, shard_targets))):
        targets[i] = target
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n"
                                        for s, t in zip(sources, targets)))
    return targets, path, False


def _read_translation_cache(path: Path, sources: list) -> list[str] | None:
    """The cached targets for ``sources``, or None when the file is missing, damaged or for other sources."""
    if not path.is_file():
        return None
    try:
        # split("\n") only: splitlines() also splits at U+2028, U+0085… inside sentences
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]
        if [row["source"] for row in rows] == sources:
            return [row["target"] for row in rows]
    except (ValueError, KeyError, TypeError):
        pass  # damaged: generated again and replaced
    return None
