"""Reading and tokenizing millions of pairs: the tool's data path (``data.load_data`` +
``data.preprocess``: Arrow, memory-mapped, several processes, cached) against a plain
``datasets.map``, with the peak memory of each, and the padding that length-grouped batches save.

    python -m benchmarks.bench_data --json benchmarks/results/data.json    # 2,000,000 pairs, ~10 min on 2 cores
    python -m benchmarks.bench_data --quick                                 # smoke test: 4,000 pairs, in-process

The corpus is the shipped training pairs (data/tatoeba_en_de/train.csv, 20,000) repeated to
``--pairs`` in one CSV of a temporary folder, with its own datasets cache (nothing outside it is
used or written). Each measurement runs in a fresh process:

  read          datasets.load_dataset("csv"): the CSV converted to Arrow once (all later steps read that)
  plain map     Dataset.map of the default preprocessor, batched, one process (the usual recipe)
  tool, 1       data.load_data + data.preprocess in one process, writing the tokenized cache
  tool, N       the same with ``--workers`` processes, into a cache of its own
  tool, warm    the same again: the tokenized pairs come from the cache; then token_lengths and
                ``--batches`` batches of the training DataLoader grouped by length
  tool, 1/10    tool, N on a tenth of the pairs: does memory follow the corpus or the batch?

Times are wall-clock seconds; "CPU s" adds up the user and system time of the process and its
workers: the work done, whatever else was running on the cores (see the load average).

Memory: the peak PSS, sampled every 50 ms, of the process and its workers together ("memory
before": the same at the start, with the libraries and the tokenizer loaded), and of its anonymous
part (heap: where Python lists of the sentences would be; the rest is pages of files, the
memory-mapped Arrow data among them, which the kernel can drop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "data" / "tatoeba_en_de"
TEACHER = REPO / "models" / "teacher-en-de"


class PeakMemory:
    """Peak memory (MB) of this process and its children together, sampled in a thread from
    /proc/<pid>/smaps_rollup: PSS (proportional set size: a page shared by n processes, as forked
    workers share their parent's, counts 1/n in each, so the sum is the memory really used) and its
    anonymous part (Pss_Anon; the rest is pages of files, the memory-mapped Arrow data among them)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.pss = self.anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        pss = anon = 0
        for p in [self.process, *self.process.children(recursive=True)]:
            try:
                rollup = Path(f"/proc/{p.pid}/smaps_rollup").read_text()
            except OSError:  # a worker that just ended
                continue
            fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}  # kB
            pss, anon = pss + fields["Pss"], anon + fields["Pss_Anon"]
        self.pss, self.anon = max(self.pss, pss / 1024), max(self.anon, anon / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------------------------
# The steps, each run in its own process (``--step``)


def step(name: str, corpus: str, cache: str, workers: int, batches: int) -> dict:
    import resource
    import datasets
    from transformers import AutoTokenizer

    import compress_model
    from mdcompress import data

    def cpu_seconds() -> float:
        return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for field in ("ru_utime", "ru_stime"))

    datasets.disable_progress_bars()
    config = compress_model.Config(dataset_path=corpus, eval_dataset_path=str(SHIPPED / "eval.csv"),
                                   preprocessing_num_workers=workers, cache_dir=cache)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    preprocessor = compress_model.default_data_preprocessor
    out: dict = {"step": name, "load_average": round(os.getloadavg()[0], 2)}
    with PeakMemory() as memory:
        memory._sample()
        out["start_pss_mb"] = round(memory.pss)  # the libraries and the tokenizer, before any data
        started = time.perf_counter()
        if name in ("read", "plain"):  # the CSV read as the tool reads it, so later steps find its Arrow copy
            builder, options = data.READERS["csv"]
            pairs = datasets.load_dataset(builder, data_files=corpus, split="train", **options)
        else:
            pairs, _ = data.load_data(config)
        out.update(read_s=round(time.perf_counter() - started, 1), pairs=len(pairs))
        if name != "read":
            started, cpu = time.perf_counter(), cpu_seconds()
            if name == "plain":
                tokenized = pairs.map(lambda batch: preprocessor(batch, tokenizer, config), batched=True,
                                      remove_columns=pairs.column_names, load_from_cache_file=False)
            else:
                tokenized = data.preprocess(pairs, tokenizer, config, preprocessor, cache_dir=cache,
                                            num_workers=workers, code=[preprocessor], say=print)
            out.update(tokenize_s=round(time.perf_counter() - started, 1), tokenize_cpu_s=round(cpu_seconds() - cpu, 1))
        if name == "tool-warm":
            sampler = iterate_batches(tokenized, tokenizer, config.batch_size, batches, out)
    out.update(peak_pss_mb=round(memory.pss), peak_anon_mb=round(memory.anon))
    if name == "tool-warm":  # outside the memory measurement: the benchmark's own arrays
        out.update(padding(tokenized, sampler, config.batch_size))
    return out


def iterate_batches(tokenized, tokenizer, batch_size: int, batches: int, out: dict):
    """Time token_lengths and ``batches`` batches of the Distiller's DataLoader (grouped by length)
    into ``out``; returns the sampler."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq

    from distillation.distillation_loss import IGNORE_INDEX
    from distillation.knowledge_distillation import LengthGroupedSampler, token_lengths

    started = time.perf_counter()
    sampler = LengthGroupedSampler(token_lengths(tokenized), batch_size, seed=42)
    out["token_lengths_s"] = round(time.perf_counter() - started, 1)
    loader = DataLoader(tokenized, batch_size=batch_size, sampler=sampler,
                        collate_fn=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX))
    started, seen = time.perf_counter(), 0
    for seen, _ in enumerate(loader, 1):
        if seen == batches:
            break
    out.update(batches=seen, batches_s=round(time.perf_counter() - started, 1))
    return sampler


def padding(tokenized, sampler, batch_size: int) -> dict:
    """The share of the positions of one epoch's padded batches (source and target) that are
    padding, in a random order and in the sampler's."""
    import numpy as np
    import pyarrow.compute as pc

    sides = [np.concatenate([pc.list_value_length(table[column]).to_numpy()
                             for table in tokenized.with_format("arrow").iter(batch_size=100_000)])
             for column in ("input_ids", "labels")]

    def share(order) -> float:
        whole = len(order) // batch_size * batch_size
        padded = real = 0
        for side in sides:
            per_batch = side[order[:whole]].reshape(-1, batch_size)  # (batches, batch_size)
            padded += int(per_batch.max(1).sum()) * batch_size
            real += int(per_batch.sum())
        return round(1 - real / padded, 4)

    grouped = np.fromiter(sampler, dtype=np.int64, count=len(sampler))
    return {"padding_random": share(np.random.default_rng(42).permutation(len(grouped))),
            "padding_grouped": share(grouped)}


# ---------------------------------------------------------------------------------------------
# The driver


def write_corpus(path: Path, pairs: int) -> None:
    """``pairs`` pairs: the shipped training pairs, repeated."""
    from mdcompress.data import read_pairs, write_pairs

    rows = read_pairs(SHIPPED / "train.csv")
    write_pairs(path, (rows[i % len(rows)] for i in range(pairs)))


def run_step(name: str, corpus: Path, work: Path, workers: int, cache: str, batches: int, quick: bool) -> dict:
    env = {"HF_DATASETS_CACHE": str(work / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    if quick:  # in this process: checks the steps, not their memory
        os.environ.update(env)
        row = step(name, str(corpus), str(work / cache), workers, batches)
    else:
        command = [sys.executable, __file__, "--step", name, "--corpus", str(corpus), "--cache", str(work / cache),
                   "--workers", str(workers), "--batches", str(batches)]
        result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"step {name} failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
    row["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2_000_000, help="pairs in the generated corpus")
    ap.add_argument("--workers", type=int, default=2, help="preprocessing_num_workers of the tool")
    ap.add_argument("--batches", type=int, default=2000, help="training batches (of 32) iterated in the warm step")
    ap.add_argument("--json", help="also write the rows and settings here")
    ap.add_argument("--quick", action="store_true",
                    help="4,000 pairs, 20 batches, every step in this process: checks the script runs")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        print(json.dumps(step(args.step, args.corpus, args.cache, args.workers, args.batches)))
        return 0
    if args.quick:
        args.pairs, args.batches = 4000, 20

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    n = args.workers
    labels = {"read": "read the CSV into Arrow", "plain": "plain datasets.map, 1 process",
              "tool-1": "tool, 1 process, first run", "tool-n": f"tool, {n} processes, first run",
              "tool-warm": "tool, second run (cached)",
              "tool-tenth": f"tool, {n} processes, first run, 1/10 of the pairs"}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        work = Path(folder)
        corpus, small = work / "corpus.csv", work / "corpus-tenth.csv"
        write_corpus(corpus, args.pairs)
        write_corpus(small, args.pairs // 10)
        print(f"corpus: {args.pairs:,} pairs, {corpus.stat().st_size / 2**20:.0f} MB of CSV", flush=True)
        steps = [("read", "read", corpus, 1, "cache-1"), ("plain", "plain", corpus, 1, "cache-1"),
                 ("tool-1", "tool-cold", corpus, 1, "cache-1"), ("tool-n", "tool-cold", corpus, n, "cache-n"),
                 ("tool-warm", "tool-warm", corpus, n, "cache-n"), ("tool-tenth", "tool-cold", small, n, "cache-n")]
        rows = [{**run_step(name, path, work, workers, cache, args.batches, args.quick), "step": label}
                for label, name, path, workers, cache in steps]

    print("\n| step | pairs | load avg | tokenize s | tokenize CPU s | memory before MB | peak memory MB | "
          "of which anonymous MB |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {labels[row['step']]} | {row['pairs']:,} | {row['load_average']} | {row.get('tokenize_s', '—')} | "
              f"{row.get('tokenize_cpu_s', '—')} | {row['start_pss_mb']:,} | {row['peak_pss_mb']:,} | "
              f"{row['peak_anon_mb']:,} |")
    warm = next(row for row in rows if row["step"] == "tool-warm")
    print(f"\ntraining batches (tool, cached): token lengths of {warm['pairs']:,} pairs in "
          f"{warm['token_lengths_s']} s; {warm['batches']:,} length-grouped batches of 32 in {warm['batches_s']} s; "
          f"padding share of one epoch's positions: {100 * warm['padding_random']:.1f}% in random batches, "
          f"{100 * warm['padding_grouped']:.1f}% grouped by length")
    if args.json:
        import datasets
        import torch
        import transformers

        Path(args.json).write_text(json.dumps({
            "started": started, "pairs": args.pairs, "workers": args.workers, "rows": rows,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "datasets": datasets.__version__},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
