"""The folders a run keeps besides its output: the checkpoints an interrupted run resumes from
(``checkpoint_dir``: run.json with the config, the evaluations and the ranks, then the training's
step checkpoints), the cache of the teacher's translations (``cache_dir``), what an interrupt leaves
in them, and the checks, before any work, that no folder the run writes clobbers what it reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

from distillation.knowledge_distillation import CHECKPOINT_ENTRIES
from mdcompress import data
from mdcompress.config import Config, ConfigError, sweep_key
from mdcompress.files import write_json_atomic
from mdcompress.errors import OutputError
from mdcompress.output_folder import check_clear_of, check_output_path


# Keys that may change between an interrupted run and its resumption: how the run is carried out, and
# what is done with the trained student (exported, evaluated in int8), which the checkpoints do not hold
RESUMABLE_CHANGES = {"progress", "overwrite_output", "num_threads", "cache_dir", "preprocessing_num_workers"}
AFTER_TRAINING = {"export", "quantize_int8", "eval_batch_size"}  # a change is said, not refused
# Keys added since whose default changed what a run does: a run.json without them ran as these say
BEFORE_THE_KEY = {"max_length_factor": None}  # translations were bounded by max_new_tokens alone


def checkpoint_dir(config: Config) -> Path:
    return Path(config.checkpoint_dir or f"{config.output_path.rstrip('/')}-checkpoints")


def cache_dir(config: Config) -> Path:
    return Path(config.cache_dir or f"{config.output_path.rstrip('/')}-cache")


def remove_checkpoints(folder: Path) -> None:
    """Delete what runs write in a checkpoint folder (run.json and the training checkpoints), then the
    folder itself if nothing else is left in it: never a file this tool did not write."""
    if not folder.is_dir():
        return
    for pattern in ("run.json", ".run.json.tmp-*", *CHECKPOINT_ENTRIES):
        for entry in folder.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # it holds something else: left alone


def start_checkpoints(folder: Path, run_state: dict) -> None:
    """A fresh checkpoint folder holding run.json (``run_state``: the config, the report so far and the
    ranks, what --resume reuses); an abandoned run's checkpoints (nothing to resume, or
    overwrite_output given) are removed first."""
    remove_checkpoints(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "run.json", run_state)


def check_resume(config: Config, resume: bool) -> dict | None:
    """The saved state of the run to resume ({"config", "report", "ranks"}), or None for a fresh run.
    Refuses to start over a checkpoint silently, and to resume with a different config. A run
    stopped before its first checkpoint left only run.json: nothing to lose by starting over, and
    --resume distills from the start, reusing its evaluations and ranks."""
    folder = checkpoint_dir(config)
    run_file = folder / "run.json"
    if not resume:
        if (folder / "latest").is_file() and not config.overwrite_output:
            raise ConfigError(f"checkpoint_dir: {str(folder)!r} holds an unfinished run; add --resume to continue "
                              f"it, or delete the folder (or set \"overwrite_output\": true) to start over")
        return None
    if not run_file.is_file():
        raise ConfigError(f"--resume: no checkpoint of an interrupted run in {str(folder)!r} (checkpoint_steps is "
                          f"{config.checkpoint_steps}); run without --resume to start")
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    now = dataclasses.asdict(config)
    # a key the interrupted run's version did not have yet ran at its default
    before = {**dataclasses.asdict(Config()), **BEFORE_THE_KEY, **saved["config"]}
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
    if refused := [k for k in changed if k not in AFTER_TRAINING]:
        k = refused[0]
        raise ConfigError(f"--resume: {k} was {json.dumps(before.get(k))} in the interrupted run and is "
                          f"{json.dumps(now[k])} now; resume with the same config (only "
                          f"{', '.join(sorted(AFTER_TRAINING))} may change)")
    saved["changed"] = {k: [before.get(k), now[k]] for k in changed}  # said by the run when it resumes
    return saved


def after_interrupt(config: Config | None, signum: int = signal.SIGINT, plan: bool = False) -> str:
    """What a run stopped by ``signum`` (SIGINT: Ctrl-C, or SIGTERM) leaves, and how to go on (one
    line). A checkpoint folder holding nothing to resume from is removed, so that the same command
    simply starts over; a plan and a sweep, which keep no checkpoints, leave it alone."""
    stopped = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if config is None:
        return stopped
    if plan:
        return f"{stopped}; a plan keeps nothing: run the same command to plan again"
    if sweep_key(config):
        return f"{stopped}; a sweep keeps no checkpoints, so nothing was kept; run the same command to start over"
    folder = checkpoint_dir(config)
    if (folder / "latest").is_file():
        latest = folder / (folder / "latest").read_text().strip()
        step = int(latest.name.split("-")[-1])
        try:
            finished = json.loads((latest / "progress.json").read_text()).get("finished", False)
        except (OSError, ValueError):
            finished = False
        if finished:
            return (f"{stopped} after training; the trained student (step {step}) is kept in {folder}: run the "
                    f"same command with --resume to evaluate and save it without training again")
        return (f"{stopped}; the checkpoint of step {step} is kept in {folder}: run the same "
                f"command with --resume to continue from it")
    if signum == signal.SIGTERM and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun stops every process with SIGTERM when one of them fails: what that failure left (run.json,
        # the evaluations) is kept for --resume, as after the failure itself
        return (f"{stopped} (torchrun stops every process when one of them fails: see the other processes' errors); "
                f"{folder} is kept: run the same command with --resume to reuse what it holds")
    remove_checkpoints(folder)
    if not config.checkpoint_steps:
        return f"{stopped}; checkpoint_steps is 0, so nothing was kept; run the same command to start over"
    return f"{stopped} before the first checkpoint, so nothing was kept; run the same command to start over"


def run_inputs(config: Config, config_path: str | os.PathLike | None = None) -> dict[str, str]:
    """{key: local path} of what the run reads (every ``*_path`` key but output_path that names a local
    file or folder, and the config file): the folders it writes must stay clear of them."""
    inputs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name.endswith("_path") and f.name != "output_path" and isinstance(getattr(config, f.name), str)
              and Path(getattr(config, f.name)).exists()}
    if config_path is not None:
        inputs["config file"] = str(config_path)
    return inputs


def check_before_work(config: Config, config_path: str | os.PathLike | None, device,
                      plan_only: bool = False) -> str | None:
    """Refuse, before any work: fp16 on a CPU; an output or checkpoint folder that would clobber
    something or overlaps the run's inputs; a cache folder that is a file. A plan (``plan_only``)
    writes neither the output nor the checkpoints: their refusal is returned instead, for the plan
    to say that the run itself would be refused, and why."""
    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision: 'fp16' needs a GPU (on a CPU, Accelerate trains in float32 without "
                          "saying so); use \"bf16\" or \"no\"")
    inputs = run_inputs(config, config_path)
    refused = None
    try:
        check_output_path(config.output_path, config.overwrite_output, inputs)
        check_clear_of("checkpoint_dir", checkpoint_dir(config), {**inputs, "output_path": config.output_path})
        if plan_only:  # a run's own check_resume (it reads what --resume continues) would refuse this
            check_resume(config, resume=False)
    except (OutputError, ConfigError) as e:
        if not plan_only:
            raise
        refused = str(e)
    if config.sequence_level_kd and cache_dir(config).exists() and not cache_dir(config).is_dir():
        raise ConfigError(f"cache_dir: {str(cache_dir(config))!r} is a file; give a folder path")
    data.tokenized_cache_dir(config)  # refuses a cache_dir that is a file
    return refused
