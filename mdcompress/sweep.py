"""A size sweep: ``target_ratio`` (or ``k_info``) given as a list compresses the teacher once per value.

``run_sweep`` runs the compressions (``compress_model.run`` each), sharing the teacher's evaluation
and the sensitivity measurement (``SweepMemory``); this module also names their folders and turns
their reports into the sweep's table, its ``report.json`` and its BLEU-against-size curve.
(``mdcompress.config.sweep_key`` says whether a config asks for a sweep.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matrix_decomposition import load_pretrained, resolve_ranks
from mdcompress.checkpoints import cache_dir, run_inputs
from mdcompress.config import Config, ConfigError
from mdcompress.errors import OutputError
from mdcompress.files import atomic_folder, write_json_atomic
from mdcompress.output_folder import check_output_path
from mdcompress.pictures import write_sweep_pictures
from mdcompress.process import quiet_transformers
from mdcompress.rank_allocation import check_target_ratio


@dataclass
class SweepMemory:
    """What the runs of one sweep share: a run takes what an earlier one stored, or stores it."""

    teacher: dict | None = None  # the teacher's report row (params, BLEU, chrF, size), evaluated by the first run
    errors: dict | None = None  # the layers' rank sensitivity curves (``rank_allocation``), measured by the first run
    teacher_planned: bool = False  # a plan has counted the time of the teacher's translations
    save_into: str | None = None  # where the current run saves its outputs (in the sweep's temporary folder)


def run_sweep(config: Config, key: str, run: Callable[..., int], resume: bool = False,
              config_path: str | os.PathLike | None = None, plan_only: bool = False) -> int:
    """One ``run`` (``compress_model.run``) per value of the list ``key`` (target_ratio or k_info) holds,
    sharing the teacher's evaluation and the sensitivity measurement (``SweepMemory``); each model goes
    to its own subfolder of output_path, with the sweep's table, report.json and BLEU-against-size
    curve next to them. The whole folder appears at the end, atomically, like a single run's."""
    values = getattr(config, key)
    if resume:
        raise ConfigError(f"--resume: a sweep ({key} {json.dumps(values)}) keeps no checkpoints and cannot be "
                          f"resumed; run it again")
    inputs = run_inputs(config, config_path)
    try:
        final, refused = check_output_path(config.output_path, config.overwrite_output, inputs), None
    except OutputError as e:  # a plan writes nothing there: it says so at its end
        if not plan_only:
            raise
        final, refused = Path(config.output_path), str(e)
    quiet_transformers()
    # every value checked on the model that is factorized before hours go into the first
    key_path = "student_model_path" if config.student_model_path else "teacher_model_path"
    base, _ = load_pretrained(getattr(config, key_path), key_path)
    for value in values:
        layers = resolve_ranks(base, config.decompose_layers, 1 if key == "target_ratio" else value)
        if key == "target_ratio":
            check_target_ratio(base, layers, value)
    del base

    def one(value) -> Config:  # its own subfolder, the sweep's sequence-level KD cache, no checkpoints
        return dataclasses.replace(config, **{key: value}, output_path=str(final / folder_name(key, value)),
                                   plan=False, checkpoint_steps=0,
                                   cache_dir=str(cache_dir(config)) if config.sequence_level_kd else config.cache_dir)

    shared = SweepMemory()
    if plan_only:
        for value in values:
            print(f"\nsweep: {key} {value}")
            run(one(value), config_path=config_path, plan_only=True, shared=shared)
        if refused:
            print(f"note: the sweep itself would be refused: {refused}")
        return 0
    with atomic_folder(final) as tmp:  # the whole folder appears when the last model is in, or not at all
        rows, failed = [], []
        for i, value in enumerate(values, 1):
            print(f"\nsweep {i}/{len(values)}: {key} {value} → {final / folder_name(key, value)}", flush=True)
            shared.save_into = str(tmp / folder_name(key, value))
            if run(one(value), config_path=config_path, shared=shared):  # saved, but an export of it failed
                failed.append(folder_name(key, value))
            report = json.loads((tmp / folder_name(key, value) / "report.json").read_text(encoding="utf-8"))
            rows.append(sweep_row(key, value, report))
        summary = sweep_report(key, rows, shared.teacher)
        write_json_atomic(tmp / "report.json", summary)
        write_json_atomic(tmp / "compression_config.json", dataclasses.asdict(config))
        write_sweep_pictures(tmp, summary)
    print_sweep(summary)
    print(f"saved to {config.output_path} (one subfolder per model; report.md shows the table and the curve)")
    return 1 if failed else 0  # each failed export was reported, with its command, when its model was saved


def folder_name(key: str, value) -> str:
    """The subfolder of one model of a sweep: ``ratio-0.5``, ``rank-16``."""
    return f"ratio-{value:g}" if key == "target_ratio" else f"rank-{value}"


def sweep_row(key: str, value, report: Mapping) -> dict:
    """One model of the sweep, from its report."""
    return {"value": value, "folder": folder_name(key, value), "params": report["student"]["params"],
            "compression_ratio": report["compression_ratio"], "size_mb": report["student"]["size_mb"],
            "bleu_decomposed": report["decomposed"]["bleu"], "chrf_decomposed": report["decomposed"]["chrf"],
            "bleu_student": report["student"]["bleu"], "chrf_student": report["student"]["chrf"],
            "train_seconds": report["train_seconds"]}


def sweep_report(key: str, rows: Sequence[Mapping], teacher: Mapping) -> dict:
    return {"sweep": key, "values": [row["value"] for row in rows], "teacher": dict(teacher), "rows": list(rows)}


def print_sweep(report: Mapping) -> None:
    teacher = report["teacher"]
    print(f"\nsize sweep over {report['sweep']}: BLEU against size")
    print(f"{'model':<14}{'params':>12}{'% teacher':>11}{'MB':>8}{'BLEU before':>13}{'BLEU after':>12}{'chrF':>8}")
    print(f"{'teacher':<14}{teacher['params']:>12,}{100.0:>10.1f}%{teacher['size_mb']:>8.2f}{'':>13}"
          f"{teacher['bleu']:>12.2f}{teacher['chrf']:>8.2f}")
    for row in report["rows"]:
        print(f"{row['folder']:<14}{row['params']:>12,}{100 * row['compression_ratio']:>10.1f}%{row['size_mb']:>8.2f}"
              f"{row['bleu_decomposed']:>13.2f}{row['bleu_student']:>12.2f}{row['chrf_student']:>8.2f}")
    print("(BLEU before: the decomposed model before recovery; after: the distilled student)")
