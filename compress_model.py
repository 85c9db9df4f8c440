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
training on the teacher's own translations (``sequence_level_kd``) and an int8 evaluation
(``quantize_int8``). ``target_ratio`` or ``k_info`` given as a list runs a size sweep (``run_sweep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from mdcompress.config import Config, ConfigError, config_help, load_config
from mdcompress.errors import UserError

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
# Model


def set_languages_(model, tokenizer, source_lang_code: str | None, target_lang_code: str | None) -> None:
    """Check the language codes asked for against a multilingual tokenizer (NLLB, M2M100, mBART:
    it has ``src_lang`` / ``tgt_lang``; the config's source_lang_code / target_lang_code) and make the target language's token the first generated one,
    as the references start with it (``generation_config.forced_bos_token_id``; for mBART-25, whose
    references end with it, ``decoder_start_token_id``), which every ``generate()`` call of the run
    and of the saved model then uses. A multilingual teacher with no target language anywhere
    (config, tokenizer, generation config) is refused: it would translate into whatever it likes."""
    name = type(tokenizer).__name__
    multilingual = hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "tgt_lang")
    given = {k: v for k, v in (("source_lang_code", source_lang_code), ("target_lang_code", target_lang_code)) if v}
    if given and not multilingual:
        key = next(iter(given))
        raise ConfigError(f"{key}: {given[key]!r} given, but the teacher's tokenizer ({name}) has no language codes "
                          f"(they are for NLLB/M2M100 and mBART-50 teachers); leave {key} out")
    if not multilingual:
        return
    target = target_lang_code or tokenizer.tgt_lang
    if not target:
        if model.generation_config.forced_bos_token_id is None:
            raise ConfigError(f"target_lang_code: the teacher's tokenizer ({name}) is multilingual and nothing says which "
                              f"language to translate into; set target_lang_code (e.g. \"deu_Latn\" for NLLB)")
        return
    ids = {}
    for key, code in {**given, "target_lang_code": target}.items():
        try:  # M2M100 names its codes "de" (token "__de__"), NLLB and mBART-50 by their tokens
            ids[key] = tokenizer.get_lang_id(code) if hasattr(tokenizer, "get_lang_id") else \
                tokenizer.convert_tokens_to_ids(code)
        except KeyError:
            ids[key] = None
        if ids[key] in (None, tokenizer.unk_token_id):
            codes = [t for t in tokenizer.all_special_tokens if not t.startswith("<")]  # not <pad>, </s>…
            raise ConfigError(f"{key}: {code!r} is not a language code of the teacher's tokenizer ({name}); "
                              f"its codes look like {', '.join(map(repr, codes[:3])) or 'nothing'}")
    if tokenizer(text_target="a")["input_ids"][0] == ids["target_lang_code"]:  # NLLB, M2M100, mBART-50
        model.generation_config.forced_bos_token_id = ids["target_lang_code"]
    else:  # mBART-25 puts the code last; the model's shift of the labels moves it first: decoding starts with it
        model.generation_config.decoder_start_token_id = ids["target_lang_code"]


def load_models(config: Config) -> tuple:
    """(teacher, the model factorized into the student, the teacher's tokenizer): the model is
    ``student_model_path``, or the teacher itself by default. A multilingual tokenizer gets the
    language codes, and the target language is forced when generating (``set_languages_``). An
    export the teacher cannot have, or a kd_top_k above its vocabulary, is refused now, not after the
    training."""
    from decomposition import check_same_vocabulary
    from matrix_decomposition import load_pretrained

    languages = {k: v for k, v in (("src_lang", config.source_lang_code), ("tgt_lang", config.target_lang_code)) if v}
    teacher, tokenizer = load_pretrained(config.teacher_model_path, "teacher_model_path", languages)
    set_languages_(teacher, tokenizer, config.source_lang_code, config.target_lang_code)
    if config.export:  # the ONNX export takes MarianMT only
        from mdcompress.onnx_export import ExportError, _check_exportable
        try:
            _check_exportable(teacher)
        except ExportError as e:
            raise ConfigError(f"export: {e}; leave export out") from None
    vocab = teacher.get_output_embeddings().out_features
    if config.kd_top_k > vocab:
        raise ConfigError(f"kd_top_k: {config.kd_top_k} is more than the teacher's vocabulary ({vocab} tokens)")
    base = teacher
    if config.student_model_path:
        base, base_tokenizer = load_pretrained(config.student_model_path, "student_model_path", languages)
        set_languages_(base, base_tokenizer, config.source_lang_code, config.target_lang_code)
        check_same_vocabulary(teacher, tokenizer, base, base_tokenizer)
    return teacher, base, tokenizer


def fit_lengths(config: Config, *models) -> Config:
    """``config`` with max_source_length, max_target_length and max_new_tokens cut to the positions
    the ``models`` can represent: longer sequences are truncated, not crashed on."""
    positions = min((getattr(m.config, "max_position_embeddings", None) or 10**9) for m in models)
    if positions >= 10**9:
        return config
    return dataclasses.replace(config, max_source_length=min(config.max_source_length, positions),
                               max_target_length=min(config.max_target_length, positions),
                               max_new_tokens=min(config.max_new_tokens, positions - 1))


# ---------------------------------------------------------------------------------------------
# Data


def model_inputs(config: Config, tokenizer, train_pairs, eval_pairs, state, say=print, teacher=None,
                 generate: dict | None = None) -> tuple:
    """(train_set, eval_set): the pairs (``data.load_data``) turned into model inputs by the
    preprocessing hook, looked up now (so a replaced ``data_preprocessor`` is the one used) and
    cached (``data.preprocess``). With ``sequence_level_kd`` and a ``teacher``, the training
    targets are the teacher's translations of the training inputs (``generate``: their settings),
    generated once and shared among the processes (``distillation.sequence_level_kd``)."""
    from mdcompress import data
    from distillation.sequence_level_kd import teacher_translations

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
    parser = argparse.ArgumentParser(description=__doc__, epilog=config_help(),
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

    interrupt = _InterruptWatch(what_is_kept)
    try:
        config = load_config(args.config)
        if args.resume and config.plan:
            raise ConfigError("plan: true only plans a run; remove it (or --resume) to continue the interrupted run")
        from mdcompress.sweep import sweep_key
        if sweep_key(config):
            code = run_sweep(config, sweep_key(config), resume=args.resume, config_path=args.config,
                             plan_only=args.plan or config.plan)
        else:
            code = run(config, resume=args.resume, config_path=args.config, plan_only=args.plan or config.plan)
        leave_process_group()
        return code
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line saying what is kept and how to go on, no traceback
        return interrupt.stopped(e)
    except Exception as e:
        if (stop := _interrupt_behind(e)) is not None:  # a library's own error while it was being interrupted
            return interrupt.stopped(stop)
        if not isinstance(e, (UserError, FloatingPointError)):
            raise
        print(f"compress_model.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2  # 2: the input was wrong; 1: the run failed
    finally:
        interrupt.close()


def leave_process_group() -> None:
    """Destroy the process group of a multi-process run (torchrun) once this process's part is done.
    Left to the interpreter's exit, gloo's worker threads can abort the process at random (SIGABRT,
    "terminate called without an active exception", pytorch/pytorch#190489). Called only after a
    run that returned: a process that failed leaves it alone, as destroying a group another process
    may still wait on in a collective can hang (the processes exchange nothing after training)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"progress", "overwrite_output", "num_threads", "cache_dir", "preprocessing_num_workers"}


def checkpoint_dir(config: Config) -> Path:
    return Path(config.checkpoint_dir or f"{config.output_path.rstrip('/')}-checkpoints")


def cache_dir(config: Config) -> Path:
    return Path(config.cache_dir or f"{config.output_path.rstrip('/')}-cache")


def remove_checkpoints(folder: Path) -> None:
    """Delete what runs write in a checkpoint folder (run.json and the training checkpoints), then the
    folder itself if nothing else is left in it: never a file this tool did not write."""
    if not folder.is_dir():
        return
    from distillation.knowledge_distillation import CHECKPOINT_ENTRIES

    for pattern in ("run.json", ".run.json.tmp", *CHECKPOINT_ENTRIES):
        for entry in folder.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # it holds something else: left alone


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, Slurm, ``docker stop``) while ``main()`` runs, raised in the main
    thread: the run stops the way Ctrl-C stops it (temporary folders removed, one line), with exit
    status 143 (128 + SIGTERM)."""


def _interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or Terminated) during whose handling ``e`` was raised, if any: a library
    cleaning up after an interrupt can raise an error of its own (datasets' worker pool, stopped while
    it tokenizes, a TimeoutError), which is no failure of the run."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


class _InterruptWatch:
    """Ctrl-C (SIGINT) and SIGTERM stop the run within seconds, whatever it was doing: the first
    signal raises KeyboardInterrupt (for SIGTERM its subclass ``Terminated``) in the main thread, and a
    watchdog thread hears of it at once through the signal wakeup file descriptor, which the C-level
    handler writes to even while the main thread is stuck in a library call (where Python's own
    handler cannot run) or deadlocked after the interrupt. Should ``main()`` not have returned after a
    grace time, the watchdog reports and exits. A signal that was ignored, or had a handler of its
    own, when ``main()`` started is left alone; the handlers are restored by ``close``. Processes
    forked meanwhile (datasets' tokenizing workers) get the default SIGTERM back and ignore SIGINT,
    which a terminal's Ctrl-C sends them too: the parent stops them, and their tracebacks stay out of
    the way of the one line."""

    GRACE_SECONDS = 15
    active: "_InterruptWatch | None" = None  # the installed watch, for the fork hook
    _fork_hook = False

    def __init__(self, describe) -> None:
        import socket
        import threading

        self.describe = describe  # signal number → the one line saying what is kept
        self.done, self.installed, self.previous = threading.Event(), False, {}
        self.report_lock, self.reported = threading.Lock(), False
        if threading.current_thread() is not threading.main_thread():
            return
        ours = {signal.SIGINT: (signal.default_int_handler, self._on_sigint),
                signal.SIGTERM: (signal.SIG_DFL, self._on_sigterm)}
        ours = {signum: handler for signum, (default, handler) in ours.items() if signal.getsignal(signum) == default}
        if not ours:
            return
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)  # the C handler must never block on it
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.previous = {signum: signal.signal(signum, handler) for signum, handler in ours.items()}
        self.installed = True
        _InterruptWatch.active = self
        if not _InterruptWatch._fork_hook:
            os.register_at_fork(after_in_child=_InterruptWatch._after_fork_in_child)
            _InterruptWatch._fork_hook = True
        threading.Thread(target=self._watchdog, name="interrupt-watchdog", daemon=True).start()

    def _on_sigint(self, signum, frame):
        raise KeyboardInterrupt

    def _on_sigterm(self, signum, frame):
        raise Terminated

    @staticmethod
    def _after_fork_in_child() -> None:
        watch, _InterruptWatch.active = _InterruptWatch.active, None
        if watch is None or not watch.installed:
            return
        try:
            signal.set_wakeup_fd(-1)  # the parent's watchdog must not hear of the child's signals
            for signum, previous in watch.previous.items():
                signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else previous)
        except ValueError:  # not the child's main thread: nothing can be changed
            pass

    def _watchdog(self) -> None:
        with self.reader:
            while True:  # the wakeup fd carries the number of every signal caught; wait for one of ours
                try:
                    received = self.reader.recv(64)
                except OSError:
                    return
                if not received:  # close(): main() returned
                    return
                signum = next((s for s in received if s in self.previous), None)
                if signum is not None:
                    break
        if self.done.wait(self.GRACE_SECONDS):
            return
        self.report(signum, raw=True)
        for name in ("multiprocess", "multiprocessing"):  # workers ignoring SIGINT must not outlive us
            if name in sys.modules:
                for child in sys.modules[name].active_children():
                    child.terminate()
        os._exit(128 + signum)

    def stopped(self, interrupt: KeyboardInterrupt) -> int:
        """Report ``interrupt`` (Ctrl-C, or SIGTERM if ``Terminated``); the exit status a shell gives a
        command the signal stopped."""
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        self.report(signum)
        return 128 + signum

    def report(self, signum: int, raw: bool = False) -> None:
        """The one line after an interrupt, once (from main(), or the watchdog with ``raw`` writes,
        which bypass Python's stderr buffer in case the stuck main thread holds it)."""
        if not self.report_lock.acquire(timeout=1):
            return
        try:
            if self.reported or int(os.environ.get("RANK", "0")) != 0:
                return
            self.reported = True
            line = f"compress_model.py: {self.describe(signum)}\n"
            if raw:
                os.write(2, line.encode())
            else:
                print(line, end="", file=sys.stderr, flush=True)
        finally:
            self.report_lock.release()

    def close(self) -> None:
        self.done.set()
        if self.installed:
            for signum, previous in self.previous.items():
                signal.signal(signum, previous)
            signal.set_wakeup_fd(self.previous_fd)
            self.writer.close()  # the watchdog reads end-of-file and leaves
            self.installed = False
            _InterruptWatch.active = None


def after_interrupt(config: Config | None, signum: int = signal.SIGINT, plan: bool = False) -> str:
    """What a run stopped by ``signum`` (SIGINT: Ctrl-C, or SIGTERM) leaves, and how to go on (one
    line). A checkpoint folder holding nothing to resume from is removed, so that the same command
    simply starts over; a plan and a sweep, which keep no checkpoints, leave it alone."""
    from mdcompress.sweep import sweep_key

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
    before = {**dataclasses.asdict(Config()), **saved["config"]}
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
    if changed:
        k = changed[0]
        raise ConfigError(f"--resume: {k} was {json.dumps(before.get(k))} in the interrupted run and is "
                          f"{json.dumps(now[k])} now; resume with the same config")
    return saved


def torch_threads(num_threads: int | None, environ=os.environ, cores: int | None = None,
                  load: float | None = None, torch_default: int | None = None) -> tuple[int, str]:
    """(threads for torch, why). ``num_threads`` if given, else ``OMP_NUM_THREADS`` if set, else
    torch's default (a thread per core) less the cores the 1-minute load average says other jobs
    keep busy: on shared cores, OpenMP threads waiting for each other slowed training 10-30×."""
    import torch

    if num_threads:
        return num_threads, "num_threads"
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(torch_default or torch.get_num_threads(), cores - round(load)))
    return threads, f"{cores} cores, load average {load:.1f}; set num_threads or OMP_NUM_THREADS to choose"


def run_inputs(config: Config, config_path: str | os.PathLike | None = None) -> dict[str, str]:
    """{key: local path} of what the run reads (every ``*_path`` key but output_path that names a local
    file or folder, and the config file): the folders it writes must stay clear of them."""
    inputs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name.endswith("_path") and f.name != "output_path" and isinstance(getattr(config, f.name), str)
              and Path(getattr(config, f.name)).exists()}
    if config_path is not None:
        inputs["config file"] = str(config_path)
    return inputs


def quiet_transformers() -> None:
    """Silence transformers' warnings and "Loading weights" bars: ours are the messages that matter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")


def check_before_work(config: Config, config_path: str | os.PathLike | None, device) -> None:
    """Refuse, before any work: fp16 on a CPU; an output or checkpoint folder that would clobber
    something or overlaps the run's inputs; a cache folder that is a file."""
    from mdcompress import data
    from mdcompress.output_folder import check_clear_of, check_output_path

    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision: 'fp16' needs a GPU (on a CPU, Accelerate trains in float32 without "
                          "saying so); use \"bf16\" or \"no\"")
    inputs = run_inputs(config, config_path)
    check_output_path(config.output_path, config.overwrite_output, inputs)
    check_clear_of("checkpoint_dir", checkpoint_dir(config), {**inputs, "output_path": config.output_path})
    if config.sequence_level_kd and cache_dir(config).exists() and not cache_dir(config).is_dir():
        raise ConfigError(f"cache_dir: {str(cache_dir(config))!r} is a file; give a folder path")
    data.tokenized_cache_dir(config)  # refuses a cache_dir that is a file


def start_checkpoints(folder: Path, run_state: dict) -> None:
    """A fresh checkpoint folder holding run.json (``run_state``: the config, the report so far and the
    ranks, what --resume reuses); an abandoned run's checkpoints (nothing to resume, or
    overwrite_output given) are removed first."""
    from mdcompress.output_folder import write_json_atomic

    remove_checkpoints(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "run.json", run_state)


def run(config: Config, resume: bool = False, config_path: str | os.PathLike | None = None, plan_only: bool = False,
        shared: dict | None = None) -> int:
    """One compression: data, teacher, decomposition, distillation, evaluation, saved outputs.
    ``plan_only`` stops after the decomposition and prints the plan (``plan.print_plan``) instead,
    writing nothing. ``shared`` is a sweep's memory across its runs: the teacher's evaluation
    ("teacher") and the sensitivity curves ("errors") are taken from it when there, stored otherwise;
    the outputs go to its "save_into" folder (the sweep's temporary one) instead of output_path."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from accelerate import PartialState

    from mdcompress import data
    import decomposition
    from distillation.knowledge_distillation import DistillationSettings, distributed_on_cpu
    from mdcompress.evaluation import evaluate_export
    from mdcompress.output_folder import save_outputs
    from mdcompress.pictures import write_run_pictures
    from mdcompress.plan import layer_spectra, no_saving_bounds, print_plan

    quiet_transformers()
    state = PartialState(cpu=distributed_on_cpu())  # one process, or one of several under torchrun / accelerate launch
    main_process = state.is_main_process
    say = print if main_process else (lambda *a, **k: None)

    # Seed and threads; refuse an output or checkpoint folder that would be clobbered, before any work
    torch.manual_seed(config.seed)
    threads, why = torch_threads(config.num_threads)
    torch.set_num_threads(threads)
    check_before_work(config, config_path, state.device)
    saved = check_resume(config, resume)  # an interrupted run's config, evaluations and ranks
    requested = dataclasses.asdict(config)  # as the user wrote it; lengths may be clamped below
    say(f"torch threads: {threads} ({why})", flush=True)

    # Data
    with state.main_process_first():
        train_pairs, eval_pairs = data.load_data(config)
    if (seen := data.shared_pairs(train_pairs, eval_pairs)):
        say(f"warning: {seen:,} of the {len(eval_pairs):,} evaluation pairs are also training pairs; "
            f"their BLEU is not on unseen sentences", flush=True)

    # Model: the teacher, and the model factorized into the student (the teacher itself by default)
    teacher, base, tokenizer = load_models(config)
    config = fit_lengths(config, teacher, base)
    # the layers, ranks, target_ratio, feature_layers and freeze keys checked on them before the pairs are tokenized
    decomposition.check_decomposition(teacher, base, config)
    generate = {"batch_size": config.eval_batch_size, "num_beams": config.num_beams,
                "max_new_tokens": config.max_new_tokens, "max_source_length": config.max_source_length,
                "progress": config.progress and main_process}

    # Model inputs, by the preprocessing hook (sequence_level_kd: the teacher's translations as targets);
    # evaluation translates what the model is trained on: the preprocessor's inputs
    train_set, eval_set = model_inputs(config, tokenizer, train_pairs, eval_pairs, state, say,
                                       teacher=None if plan_only else teacher, generate=generate)
    sources, references = eval_set["input_ids"], eval_pairs["target_text"]

    # Decompose: choose the ranks (k_info, or allocated to target_ratio), factorize
    student = decomposition.decompose(teacher, base, tokenizer, train_set, config, (saved or {}).get("ranks"), shared,
                                      progress=config.progress and main_process, say=say,
                                      cache_dir=data.tokenized_cache_dir(config))
    folder = checkpoint_dir(config)
    resume_training = bool(saved) and (folder / "latest").is_file()  # else distilled from the start
    settings = DistillationSettings.from_config(config, str(folder), resume=resume_training,
                                                cache_dir=str(data.tokenized_cache_dir(config)))
    if plan_only:  # the plan: these layers and ranks, their sizes, speed and time; nothing written
        if main_process:
            print_plan(teacher, student.model, student.ranks, tokenizer, train_set, eval_set, config, settings,
                       student.feature_layers, decompose_seconds=student.seconds, shared=shared,
                       cached_seconds=student.cached_seconds)
        return 0

    # Evaluate the teacher and the decomposed model before recovery (once: a resumed run reuses it)
    if saved:
        report = saved["report"]
        say(f"resuming from {folder}" + ("" if resume_training else " (no checkpoint yet: distilling from the start)"),
            flush=True)
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

    # Save (atomically, with the exports asked for and the pictures); then drop the run's checkpoints
    pictures = partial(write_run_pictures, spectra=layer_spectra(base, student.ranks),
                       bounds=no_saving_bounds(base, student.ranks))
    save_outputs((shared or {}).get("save_into", config.output_path), model, tokenizer, report,
                 dataclasses.asdict(config), exports=config.export,
                 evaluate=partial(evaluate_export, sources=sources, references=references, **generate),
                 write_more=pictures)
    remove_checkpoints(folder)
    print_report(report)
    print(f"saved to {config.output_path}" + (" (when the sweep ends)" if shared else ""))
    return 0


def run_sweep(config: Config, key: str, resume: bool = False, config_path: str | os.PathLike | None = None,
              plan_only: bool = False) -> int:
    """One ``run`` per value of the list ``key`` (target_ratio or k_info) holds, sharing the teacher's
    evaluation and the sensitivity measurement; each model goes to its own subfolder of output_path,
    with the sweep's table, report.json and BLEU-against-size curve next to them. The whole folder
    appears at the end, atomically, like a single run's."""
    import tempfile

    from matrix_decomposition import load_pretrained, resolve_ranks
    from mdcompress.output_folder import check_output_path, replace_folder, write_json_atomic
    from mdcompress.pictures import write_sweep_pictures
    from mdcompress.rank_allocation import check_target_ratio
    from mdcompress.sweep import folder_name, print_sweep, sweep_report, sweep_row

    values = getattr(config, key)
    if resume:
        raise ConfigError(f"--resume: a sweep ({key} {json.dumps(values)}) keeps no checkpoints and cannot be "
                          f"resumed; run it again")
    inputs = run_inputs(config, config_path)
    final = check_output_path(config.output_path, config.overwrite_output, inputs)
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

    shared: dict = {}
    if plan_only:
        for value in values:
            print(f"\nsweep: {key} {value}")
            run(one(value), config_path=config_path, plan_only=True, shared=shared)
        return 0
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        rows = []
        for i, value in enumerate(values, 1):
            print(f"\nsweep {i}/{len(values)}: {key} {value} → {final / folder_name(key, value)}", flush=True)
            shared["save_into"] = str(tmp / folder_name(key, value))
            run(one(value), config_path=config_path, shared=shared)
            report = json.loads((tmp / folder_name(key, value) / "report.json").read_text(encoding="utf-8"))
            rows.append(sweep_row(key, value, report))
        summary = sweep_report(key, rows, shared["teacher"])
        write_json_atomic(tmp / "report.json", summary)
        write_json_atomic(tmp / "compression_config.json", dataclasses.asdict(config))
        write_sweep_pictures(tmp, summary)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_sweep(summary)
    print(f"saved to {config.output_path} (one subfolder per model; report.md shows the table and the curve)")
    return 0


if __name__ == "__main__":
    code = main()
    if code in (130, 143):  # Ctrl-C, SIGTERM: leave at once, not waiting for threads a library left running
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
