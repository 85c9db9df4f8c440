"""Compress a translation model (MarianMT, NLLB/M2M100, mBART, BART, T5/mT5) by matrix decomposition,
then recover it by distillation.

    python compress_model.py                     # reads ./config.json
    python compress_model.py --config my.json    # another config
    python compress_model.py --plan              # what the run would do: layers, ranks, sizes, time; writes nothing
    torchrun --nproc_per_node 2 compress_model.py   # data-parallel distillation

The chosen ``nn.Linear`` weights W (n×d) of the teacher are replaced by truncated-SVD factors
B'·C' of rank ``k_info`` (Ben Noach & Goldberg, AACL 2020); the factorized student is then
trained to imitate the untouched teacher. The run writes the compressed model and a
``report.json`` comparing teacher, decomposed and recovered student (params, BLEU, chrF).
Beyond that: factors fitted to the layers' activations (``init``), ranks allocated to a
parameter budget (``target_ratio``), the shared embedding factorized too (``model.shared.weight``),
training on the teacher's own translations (``sequence_level_kd``), an int8 evaluation
(``quantize_int8``) and, before anything is factorized, the vocabulary of teacher and student trimmed to
the tokens the pairs use (``trim_vocabulary``). ``target_ratio`` or ``k_info`` given as a list runs a
size sweep (``run_sweep``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from functools import partial

import torch
from accelerate import PartialState

import decomposition
from distillation.knowledge_distillation import DistillationSettings, check_gpus_for_processes, distributed_on_cpu
from distillation.sequence_level_kd import teacher_translations
from mdcompress import data, plan, vocabulary
from mdcompress.checkpoints import (
    after_interrupt,
    cache_dir,
    check_before_work,
    check_resume,
    checkpoint_dir,
    remove_checkpoints,
    start_checkpoints,
)
# Config, ConfigError and load_config are compress_model's names too (the hook's signature names Config)
from mdcompress.config import Config, ConfigError, config_help, load_config, sweep_key
from mdcompress.errors import UserError
from mdcompress.evaluation import evaluate_export
from mdcompress.models import fit_lengths, load_models
from mdcompress.output_folder import save_outputs
from mdcompress.pictures import write_run_pictures
from mdcompress.process import (
    InterruptWatch,
    exit_with,
    interrupt_behind,
    leave_process_group,
    program_name,
    quiet_transformers,
    torch_threads,
)
from mdcompress.sweep import SweepMemory, run_sweep

# ---------------------------------------------------------------------------------------------
# Preprocessing hook: replace this function (edit it here, or assign
# ``compress_model.data_preprocessor = your_function`` before calling ``main()``).


def data_preprocessor(batch: dict[str, list[str]], tokenizer, config: "Config") -> dict[str, list]:
    """Turn a batch of raw pairs into model inputs.

    ``batch`` holds the columns ``source_text`` and ``target_text`` (lists of strings), ``tokenizer``
    is the teacher's, ``config`` the run's ``Config``. Return at least ``input_ids``,
    ``attention_mask`` and ``labels`` (lists of token ids per example). The default tokenizes the
    source and the target, truncated to ``max_source_length`` / ``max_target_length``; padding
    happens per batch later, with labels padded by -100 so padded positions are ignored by the loss.

    Example override, straightening typographic quotes in the sources (the shipped Tatoeba data
    writes them straight)::

        def data_preprocessor(batch, tokenizer, config):
            straight = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"'})
            batch = {**batch, "source_text": [s.translate(straight) for s in batch["source_text"]]}
            return default_data_preprocessor(batch, tokenizer, config)

    A target-language tag (``">>fra<< " + s``) belongs only to multilingual OPUS-MT models such
    as opus-mt-en-ROMANCE; a bilingual model never saw one, and it costs it most of its BLEU.
    T5's task prefix (``"translate English to German: " + s``) belongs here too; the language codes
    of NLLB/M2M100 and mBART are config keys (``source_lang_code``, ``target_lang_code``), not text.
    """
    return default_data_preprocessor(batch, tokenizer, config)


def default_data_preprocessor(batch: dict[str, list[str]], tokenizer, config: "Config") -> dict[str, list]:
    inputs = tokenizer(batch["source_text"], max_length=config.max_source_length, truncation=True)
    targets = tokenizer(text_target=batch["target_text"], max_length=config.max_target_length, truncation=True)
    return {**inputs, "labels": targets["input_ids"]}



# ---------------------------------------------------------------------------------------------
# Data


def model_inputs(config: Config, tokenizer, train_pairs, eval_pairs, state, say=print, teacher=None,
                 generate: dict | None = None) -> tuple:
    """(train_set, eval_set): the pairs (``data.load_data``) turned into model inputs by the
    preprocessing hook, looked up now (so a replaced ``data_preprocessor`` is the one used) and
    cached (``data.preprocess``). With ``sequence_level_kd`` and a ``teacher``, the training
    targets are the teacher's translations of the training inputs (``generate``: their settings),
    generated once and shared among the processes (``distillation.sequence_level_kd``)."""
    preprocessor = globals()["data_preprocessor"]

    def preprocess(pairs):  # tokenized once: a later run with the same data, tokenizer and code reads the cache
        return data.preprocess(pairs, tokenizer, config, preprocessor, cache_dir=data.tokenized_cache_dir(config),
                               num_workers=config.preprocessing_num_workers, code=[default_data_preprocessor], say=say)

    with state.main_process_first():
        train_set = preprocess(train_pairs)
        eval_set = preprocess(eval_pairs)
    if config.sequence_level_kd and teacher is not None:
        targets, cache_file, reused = teacher_translations(teacher, tokenizer, train_set["input_ids"],
                                                           cache_dir(config), config.teacher_model_path, **generate)
        say(f"sequence-level KD: teacher translations of {len(targets):,} training sources "
            f"{'reused from' if reused else 'cached in'} {cache_file}", flush=True)
        train_pairs = train_pairs.remove_columns("target_text").add_column("target_text", targets)
        with state.main_process_first():
            train_set = preprocess(train_pairs)
    return train_set, eval_set


# ---------------------------------------------------------------------------------------------
# The run


def print_report(report: dict) -> None:
    teacher_params = report["teacher"]["params"]
    print(f"\n{'model':<18}{'params':>12}{'% teacher':>11}{'BLEU':>8}{'chrF':>8}{'MB':>9}")
    for name in ("teacher", "student_base", "decomposed", "student", "student_int8", "student_onnx", "student_onnx_int8"):
        row = report.get(name)
        if row is None:
            continue
        print(f"{name:<18}{row['params']:>12,}{100 * row['params'] / teacher_params:>10.1f}%"
              f"{row['bleu']:>8.2f}{row['chrf']:>8.2f}{row.get('size_mb', float('nan')):>9.2f}")
    epochs = report["train_pairs"] / report["train_dataset_pairs"]
    print(f"compression ratio {report['compression_ratio']:.3f} (student params / teacher params); "
          f"{report['layers_decomposed']} layers decomposed; recovered in {report['train_seconds'] / 60:.1f} min "
          + (f"(+ {report['teacher_cache_seconds']:.0f} s for the teacher's top-{report['kd_top_k']} logits) "
             if report.get("teacher_cache_seconds") else "") +
          f"on {report['train_pairs']:,} pairs ({epochs:.3g} epoch{'' if epochs == 1 else 's'} of "
          f"{report['train_dataset_pairs']:,}; "
          f"{report['train_target_tokens']:,} target tokens); evaluated on {report['eval_pairs']:,} pairs")


def main(argv: list[str] | None = None) -> int:
    # the name the user typed: matrix-decomposition once installed; compress_model.py for main(argv) from Python
    prog = program_name() if argv is None else "compress_model.py"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.json", help="the JSON config to run (default: ./config.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run from its latest checkpoint (same config)")
    mode.add_argument("--plan", action="store_true",
                      help="print the layers, ranks, sizes, predicted speed-up and estimated time of the run, then "
                           "stop; writes nothing")
    args = parser.parse_args(argv)
    config = None

    def what_is_kept(signum: int) -> str:  # the line after a signal: config as loaded by then
        return after_interrupt(config, signum, plan=args.plan or bool(config and config.plan))

    interrupt = InterruptWatch(what_is_kept, prog)
    try:
        config = load_config(args.config)
        if args.resume and config.plan:
            raise ConfigError("plan: true only plans a run; remove it (or --resume) to continue the interrupted run")
        if sweep_key(config):
            code = run_sweep(config, sweep_key(config), partial(run, prog=prog), resume=args.resume,
                             config_path=args.config, plan_only=args.plan or config.plan)
        else:
            code = run(config, resume=args.resume, config_path=args.config, plan_only=args.plan or config.plan,
                       prog=prog)
        leave_process_group()
        return code
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line saying what is kept and how to go on, no traceback
        return interrupt.stopped(e)
    except Exception as e:
        if (stop := interrupt_behind(e)) is not None:  # a library's own error while it was being interrupted
            return interrupt.stopped(stop)
        if not isinstance(e, (UserError, FloatingPointError)):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2  # 2: the input was wrong; 1: the run failed
    finally:
        interrupt.close()


def run(config: Config, resume: bool = False, config_path: str | os.PathLike | None = None, plan_only: bool = False,
        shared: SweepMemory | None = None, prog: str = "compress_model.py") -> int:
    """One compression: data, teacher, decomposition, distillation, evaluation, saved outputs.
    ``plan_only`` stops after the decomposition and prints the plan (``plan.print_plan``) instead,
    writing nothing. ``shared`` is a sweep's memory across its runs: the teacher's evaluation and the
    sensitivity curves are taken from it when there, stored otherwise; the outputs go to its
    ``save_into`` folder (the sweep's temporary one) instead of output_path. ``prog`` is the command's name
    in the line that reports an export that failed after training."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    check_gpus_for_processes()
    state = PartialState(cpu=distributed_on_cpu())  # one process, or one of several under torchrun / accelerate launch
    main_process = state.is_main_process
    say = print if main_process else (lambda *a, **k: None)

    # Seed (and threads); refuse an output or checkpoint folder that would be clobbered, before any work
    torch.manual_seed(config.seed)
    threads, why = torch_threads(config.num_threads)
    torch.set_num_threads(threads)
    refused = check_before_work(config, config_path, state.device, plan_only)  # a plan only says so, at its end
    saved = None if plan_only else check_resume(config, resume)  # an interrupted run's config, evaluations and ranks
    requested = dataclasses.asdict(config)  # as the user wrote it; lengths may be clamped below
    say(f"torch threads: {threads} ({why})", flush=True)

    # Data
    with state.main_process_first():
        train_pairs, eval_pairs = data.load_data(config)
    if (seen := data.shared_pairs(train_pairs, eval_pairs)):
        say(f"warning: {seen:,} of the {len(eval_pairs):,} evaluation pairs are also training pairs; "
            f"their BLEU is not on unseen sentences", flush=True)

    # Model: the teacher, and the model factorized into the student (the teacher itself by default); the
    # layers, ranks, target_ratio, feature_layers and freeze keys resolved on them (once) before the pairs are tokenized
    teacher, base, tokenizer = load_models(config)
    config = fit_lengths(config, teacher, base)
    targets = decomposition.check_decomposition(teacher, base, config)
    if config.trim_vocabulary:  # its files, the tokenizer's format, the ids it keeps: before the pairs are tokenized
        vocabulary.check_trimmable(config, teacher, tokenizer)
    generate = {"batch_size": config.eval_batch_size, "num_beams": config.num_beams,
                "max_new_tokens": config.max_new_tokens, "max_length_factor": config.max_length_factor,
                "max_source_length": config.max_source_length,
                "progress": config.progress and main_process}

    # Model inputs, by the preprocessing hook (sequence_level_kd: the teacher's translations as targets);
    # evaluation translates what the model is trained on: the preprocessor's inputs
    train_set, eval_set = model_inputs(config, tokenizer, train_pairs, eval_pairs, state, say,
                                       teacher=None if plan_only else teacher, generate=generate)

    # Trim the vocabulary to the tokens of the pairs (trim_vocabulary): teacher and model alike, so that the
    # teacher's logits are over the student's ids; the pairs renumbered; the layers resolved again on the trimmed model
    trimmed = None
    if config.trim_vocabulary:
        trimmed = vocabulary.trim_run(config, teacher, base, tokenizer, train_set, eval_set)
        tokenizer, train_set, eval_set = trimmed.tokenizer, trimmed.train_set, trimmed.eval_set
        targets = decomposition.check_decomposition(teacher, base, config)
        trim = trimmed.trim
        say(f"vocabulary trimmed to the pairs' tokens: {trim.before[0]:,} → {len(trim.source):,} tokens"
            + ("" if trim.shared else f" (target side {trim.before[1]:,} → {len(trim.target):,})")
            + f"; {trimmed.params_before:,} → {trimmed.params_after:,} params "
              f"({100 * trimmed.params_after / trimmed.params_before:.1f}%) before factorizing", flush=True)
    sources, references = eval_set["input_ids"], eval_pairs["target_text"]

    # Decompose: choose the ranks (k_info, or allocated to target_ratio), factorize
    student = decomposition.decompose(teacher, base, tokenizer, train_set, config, targets, (saved or {}).get("ranks"),
                                      shared, progress=config.progress and main_process, say=say,
                                      cache_dir=data.tokenized_cache_dir(config))
    folder = checkpoint_dir(config)
    resume_training = bool(saved) and (folder / "latest").is_file()  # else distilled from the start
    settings = DistillationSettings(config, checkpoint_dir=str(folder) if config.checkpoint_steps else None,
                                    resume=resume_training, cache_dir=str(data.tokenized_cache_dir(config)))
    if plan_only:  # the plan: these layers and ranks, their sizes, speed and time; nothing written
        if main_process:
            plan.print_plan(teacher, student.model, student.ranks, tokenizer, train_set, eval_set, settings,
                            student.feature_layers, decompose_seconds=student.seconds, shared=shared,
                            cached_seconds=student.cached_seconds, trimmed=trimmed)
            if refused and shared is None:  # a sweep says it once, for its folder
                print(f"note: the run itself would be refused: {refused}")
        return 0

    # Evaluate the teacher and the decomposed model before recovery (once: a resumed run reuses it)
    if saved:
        report = saved["report"]
        say(f"resuming from {folder}" + ("" if resume_training else " (no checkpoint yet: distilling from the start)"),
            flush=True)
        for key, (was, now) in saved["changed"].items():
            say(f"{key} changed since the interrupted run: {json.dumps(was)} → {json.dumps(now)}", flush=True)
    elif main_process:
        report = decomposition.evaluate_before(teacher, base, student.model, tokenizer, sources, references, generate,
                                               shared)
        if config.checkpoint_steps:
            start_checkpoints(folder, {"config": requested, "report": report, "ranks": student.ranks})

    # Distill
    distiller = decomposition.distill(teacher, student.model, tokenizer, train_set, eval_set, settings,
                                      student.feature_layers)
    if not main_process:
        return 0

    # Evaluate the recovered student; the report
    model, report = decomposition.result(report, teacher, student, distiller, tokenizer, sources, references, config,
                                         generate, len(train_set))
    report["trimmed_vocabulary"] = trimmed.report() if trimmed is not None else None

    # Save (atomically, with the exports asked for and the pictures; a sweep's run into the sweep's temporary
    # folder); then drop the run's checkpoints
    save_into = (shared.save_into if shared is not None else None) or config.output_path
    pictures = partial(write_run_pictures, spectra=plan.layer_spectra(base, student.ranks),
                       bounds=plan.no_saving_bounds(base, student.ranks))
    failed = save_outputs(save_into, model, tokenizer, report, dataclasses.asdict(config), exports=config.export,
                          evaluate=partial(evaluate_export, sources=sources, references=references, **generate),
                          write_more=pictures)
    remove_checkpoints(folder)
    print_report(report)
    print(f"saved to {config.output_path}" + (" (when the sweep ends)" if save_into != config.output_path else ""))
    if failed:  # the student is saved; the export is what failed, and can be run again on the saved folder
        name, reason = next(iter(failed.items()))
        more = f" (and {', '.join(list(failed)[1:])})" if len(failed) > 1 else ""
        flag = " --int8" if name.endswith("int8") else ""
        print(f"{prog}: error: export {name}{more} failed: {reason}; the trained student is saved in "
              f"{config.output_path}: export it with python -m mdcompress.onnx_export --model {config.output_path}{flag}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_with(main())
