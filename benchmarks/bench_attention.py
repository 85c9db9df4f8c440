"""Fused against plain attention in the ONNX exports (``onnx_attention``), at opus-mt-en-de's shape:
sentences per second of the int8 (``--precisions``) exports of the dense model and its ~50% student
(``bench_deploy``'s ``opus`` models: random weights), each written twice, its attention as ONNX
Runtime's MultiHeadAttention operator (fused) and as standard operators (plain).

    python -m benchmarks.bench_attention --work /tmp/bench-attention    # 1 thread, 7 rounds
    python -m benchmarks.bench_attention --quick                         # smoke test: tiny models, seconds

Each system translates 64 random sources of 16 tokens (8 of them at batch 1) into exactly 32 tokens
(EOS kept out until then), so every system does the same work; "same" counts the translations equal to
the plain export's. Speed is the median over ``--rounds`` interleaved rounds (each round times every
system once, in rotating order), with the spread (slowest and fastest round), threads pinned to
``--threads``; in sentences per second of wall time and, on cores other jobs share, per second of
this process's CPU time (``process_time``: with one thread, ONNX Runtime runs in the calling one), which
the other jobs do not inflate. Then one decoder step alone (16 cached positions, 16 source tokens), at
batch 32 and 1: its CPU ms, the median over ``--steps`` runs of each export in turn (without the
profiler, whose cost per node would weigh on the graph of more nodes); and ONNX Runtime's profiler
splits the step at batch 32 by operator (the fused node: self-attention over the cache and
cross-attention apart), in ms of CPU time.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from benchmarks.bench_deploy import opus_models, padded  # noqa: E402
from mdcompress.onnx_export import ATTENTIONS, export  # noqa: E402
from mdcompress.process import quiet_transformers  # noqa: E402
from mdcompress.translate import OnnxTranslator  # noqa: E402


def timed(systems: dict, inputs: dict[int, list[list[int]]], rounds: int, length: int) -> dict:
    """{clock: {system: {batch size: [seconds per round]}}} of the wall and the CPU clock, and the last
    round's outputs, rounds interleaved."""
    names = list(systems)
    times = {clock: {name: {b: [] for b in inputs} for name in names} for clock in ("wall", "cpu")}
    outputs = {name: {} for name in names}
    for translator in systems.values():  # warm-up: first calls allocate and plan
        translator.generate(*padded(inputs[max(inputs)][:2], translator.pad), max_new_tokens=4)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            translator = systems[name]
            for batch_size, sources in inputs.items():
                result = []
                start, cpu = time.perf_counter(), time.process_time()
                for at in range(0, len(sources), batch_size):
                    result += translator.generate(*padded(sources[at:at + batch_size], translator.pad),
                                                  max_new_tokens=length, min_new_tokens=length)
                times["wall"][name][batch_size].append(time.perf_counter() - start)
                times["cpu"][name][batch_size].append(time.process_time() - cpu)
                outputs[name][batch_size] = result
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return times, outputs


def step_feed(info: dict, batch: int, past: int, source: int) -> dict:
    """The inputs of one decoder step: batch ``batch``, ``past`` cached positions, ``source`` source tokens."""
    generator = np.random.default_rng(0)
    feed = {"input_ids": np.full((batch, 1), 5, np.int64), "attention_mask": np.ones((batch, source), np.int64)}
    for names, length in ((info["past"], past), (info["cross"], source)):
        for name in names:
            feed[name] = generator.standard_normal((batch, info["heads"], length, info["head_dim"]), np.float32)
    return feed


def step_times(folders: dict, batch: int, past: int, source: int, threads: int, steps: int) -> dict:
    """{name: CPU ms of one decoder step}, the median of ``steps`` runs, the exports run in turn."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    runs = {}
    for name, folder in folders.items():
        session = ort.InferenceSession(str(folder / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
        feed = step_feed(json.loads((folder / "onnx_export.json").read_text()), batch, past, source)
        for _ in range(3):
            session.run(None, feed)
        runs[name] = (session, feed)
    cpu = {name: [] for name in folders}
    for _ in range(steps):
        for name, (session, feed) in runs.items():
            start = time.process_time()
            session.run(None, feed)
            cpu[name].append(time.process_time() - start)
    return {name: round(1000 * statistics.median(t), 3) for name, t in cpu.items()}


def step_profile(folder: Path, batch: int, past: int, source: int, threads: int, steps: int = 50) -> dict:
    """One decoding step of an export: CPU ms per step (the median of ``steps``), and the ms of each
    operator type in it (ONNX Runtime's profiler, after its graph optimizations; its kernel times
    scaled to the CPU time), cache of ``past`` positions; MultiHeadAttention split into its self-attention
    (with a cache) and cross-attention nodes."""
    import onnxruntime as ort

    info = json.loads((folder / "onnx_export.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling, options.profile_file_prefix = True, str(folder.parent / f"profile-{folder.name}")
    session = ort.InferenceSession(str(folder / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    feed = step_feed(info, batch, past, source)
    for _ in range(3):
        session.run(None, feed)
    cpu = []
    for _ in range(steps):
        start = time.process_time()
        session.run(None, feed)
        cpu.append(time.process_time() - start)
    ms = 1000 * statistics.median(cpu)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            if op == "MultiHeadAttention":  # 5 inputs (query, key, value, past key, past value): the cache's
                op += " (self)" if len(event["args"]["input_type_shape"]) == 5 else " (cross)"
            by_op[op] = by_op.get(op, 0) + event["dur"]
    total = sum(by_op.values())
    return {"ms_per_step": round(ms, 2), "ms": {op: round(ms * t / total, 3) for op, t in
                                                 sorted(by_op.items(), key=lambda kv: -kv[1])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", choices=["float32", "int8"], default=["int8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200, help="runs of the decoder step alone, of each export")
    parser.add_argument("--work", default=None, help="folder for the models and exports (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, few sentences, one round")
    args = parser.parse_args(argv)
    quiet_transformers()
    if args.quick:
        args.rounds, args.steps = 1, 5
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-attention-"))
    work.mkdir(parents=True, exist_ok=True)
    dense_dir, student_dir = opus_models(work, args.quick)

    systems = {}
    for role, folder in (("dense", dense_dir), ("student", student_dir)):
        for precision in args.precisions:
            for attention in ATTENTIONS:
                out = work / f"onnx-{role}-{precision}-{attention}"
                if not out.exists():
                    export(folder, out, precision, attention=attention)
                translator = OnnxTranslator(out, args.threads)
                translator.pad = translator.tokenizer.pad_token_id
                assert translator.info["attention"] == attention, (out, translator.info.get("attention_fallback"))
                systems[f"{role} {precision} {attention}"] = translator

    generator = np.random.default_rng(0)
    vocab = systems[next(iter(systems))].info["vocab_size"]
    sources = [[*generator.integers(2, vocab - 1, 15).tolist(), 0] for _ in range(16 if args.quick else 64)]
    length = 8 if args.quick else 32
    inputs = {32: sources, 1: sources[:2 if args.quick else 8]}
    times, outputs = timed(systems, inputs, args.rounds, length)

    rows = []
    for clock in ("wall", "cpu"):
        for name in systems:
            plain = name.rsplit(" ", 1)[0] + " plain"
            row = {"system": name, "clock": clock,
                   "same": sum(a == b for a, b in zip(outputs[name][32], outputs[plain][32]))}
            for b in inputs:
                speeds = [len(inputs[b]) / t for t in times[clock][name][b]]
                row[f"sent_per_s_b{b}"] = round(statistics.median(speeds), 2)
                row[f"spread_b{b}"] = [round(min(speeds), 2), round(max(speeds), 2)]
                base = [len(inputs[b]) / t for t in times[clock][plain][b]]
                row[f"vs_plain_b{b}"] = round(statistics.median(speeds) / statistics.median(base), 3)
            rows.append(row)
    folders = {name: translator.folder for name, translator in systems.items()}
    steps = {b: step_times(folders, b, 16, 16, args.threads, args.steps) for b in (32, 1)}
    profiles = {name: step_profile(systems[name].folder, 32, 16, 16, args.threads) for name in systems}
    results = {"threads": args.threads, "rounds": args.rounds, "sentences": {b: len(s) for b, s in inputs.items()},
               "new_tokens": length, "systems": rows, "step_ms": steps, "step_profile": profiles}

    print("| system | clock | sent/s batch 32 (spread) | × plain | sent/s batch 1 (spread) | × plain | same |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [f"{row[f'sent_per_s_b{b}']:.2f} ({row[f'spread_b{b}'][0]:.2f}–{row[f'spread_b{b}'][1]:.2f}) | "
                 f"{row[f'vs_plain_b{b}']:.2f}" for b in (32, 1)]
        print(f"| {row['system']} | {row['clock']} | {cells[0]} | {cells[1]} | {row['same']}/{len(sources)} |")
    for b, times in steps.items():
        print(f"decoder step alone, batch {b}, CPU ms (median of {args.steps}): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in times.items()))
    for name, profile in profiles.items():
        top = ", ".join(f"{op} {t:.2f}" for op, t in list(profile["ms"].items())[:8])
        print(f"decoder step, {name}: {profile['ms_per_step']:.2f} ms CPU ({top})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
