"""Speed at real scale: a dense opus-mt-en-de-shaped MarianMTModel against copies factorized by
``decompose_(model, [], rank)``, for teacher-forced forward passes and greedy generation.

The model has random weights (no download): d_model 512, 6+6 layers, 8 heads, ffn 2048, vocab
58101, shared embeddings. Every ``nn.Linear`` inside the encoder/decoder layers is factorized
(96 linears); the embeddings and the tied ``lm_head`` (58101×512) are not. For each model:

- params and % of dense;
- teacher-forced forward (encoder + decoder with given ``decoder_input_ids``, source and target
  length 32, logits for every position, no cache) at batch 1 and 16;
- greedy generation of exactly N new tokens (``min_new_tokens = max_new_tokens = N``, KV cache)
  at batch 1 and 16, so every model does the same number of decoder steps;
- measured speedup vs dense (median over repeats of the dense/factorized ratio of the same round),
  the speedup an analytic multiply-add count predicts, and measured/predicted.

The FLOP model (``plan.predicted_macs``, shared with ``compress_model.py --plan``) counts the work that factorization changes plus the work it cannot touch:
every linear (r·(n+d) per token when factorized, n·d when dense), the attention score and value
matmuls (2·Lq·Lk·d_model per layer), and the lm_head (V·d per decoded token). In generation the
decoder runs one token per step, self-attention reads a cache of t keys at step t, and the
cross-attention k/v projections of the source are computed once per sequence. Layer norms,
activations, softmax, the logits bias, embedding look-ups and Python overhead are not counted:
they are the same for every model, so they pull the measured speedup below the prediction.
The "undecomposed" column is the share of dense multiply-adds in lm_head + attention matmuls;
1/share is the speedup ceiling even if the factorized layers cost nothing.

Method: threads pinned, ``torch.inference_mode``, warm-up, then dense and factorized models are
timed round-robin in the same process (each round visits every model, in rotating order), and
medians are reported; on a shared, noisy machine only ratios from the same run mean anything.
Each timing repeats the call until it lasts ``--min-time`` seconds. The "Cost" section times
``decompose_`` (svd 'auto') on the full model at each rank and reports resident memory.

    nice -n 10 python -m benchmarks.bench_speed --json speed.json   # 2 threads: for quiet cores
    nice -n 10 python -m benchmarks.bench_speed --threads 1         # on a busy shared machine
    python -m benchmarks.bench_speed --quick                         # smoke test: tiny model, seconds

With ``--threads 1`` the full run took 4 min next to a training job on 2 cores (load average ~3).
Do not use 2 threads on cores that are already busy: each op's OpenMP barrier then waits for a
descheduled thread, every call gets 10–100× slower (the same run took 37 min, and ``decompose_``
100 s per rank instead of 2–6 s), and the times measure the scheduler rather than the model.
The script prints a note when the load average says the cores are not free.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import MarianConfig, MarianMTModel
from transformers.utils import logging as hf_logging
from matrix_decomposition import (  # noqa: E402
    DecompositionError,
    count_parameters,
    decompose_,
    default_targets,
)
from mdcompress.plan import predicted_macs  # noqa: E402  (the FLOP model, shared with the plan)

FULL_MODEL = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                  decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=58101,
                  max_position_embeddings=512, share_encoder_decoder_embeddings=True,
                  pad_token_id=58100, eos_token_id=0, decoder_start_token_id=58100)
QUICK_MODEL = dict(FULL_MODEL, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=1000,
                   max_position_embeddings=64, pad_token_id=999, decoder_start_token_id=999)
# Settings per mode; a flag given on the command line wins.
FULL = dict(ranks="64,128,192", batch_sizes="1,16", src_len=32, tgt_len=32, new_tokens=32, repeats=7,
            warmup=2, min_time=0.25)
QUICK = dict(ranks="8,16", batch_sizes="1,2", src_len=8, tgt_len=8, new_tokens=4, repeats=1,
             warmup=1, min_time=0.0)
TARGET_GEN_SPEEDUP = 1.45  # the paper's generation speedup at opus-mt-en-de shape
TARGET_EFFICIENCY = 0.85  # measured speedup as a share of the FLOP prediction


# ---------------------------------------------------------------------------------------------
# Timing


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def seconds_per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def workloads(config: MarianConfig, batch_sizes: list[int], src_len: int, tgt_len: int, new_tokens: int):
    """[(label, mode, batch, tokens decoded, make_call(model) → zero-argument callable)]."""
    generator = torch.Generator().manual_seed(0)
    low, high = 1, config.vocab_size - 1  # neither eos (0) nor pad (vocab - 1)
    result = []
    for batch in batch_sizes:
        source = torch.randint(low, high, (batch, src_len), generator=generator)
        source[:, -1] = config.eos_token_id
        mask = torch.ones_like(source)
        decoder_input = torch.randint(low, high, (batch, tgt_len), generator=generator)
        decoder_input[:, 0] = config.decoder_start_token_id

        def forward(model, source=source, mask=mask, decoder_input=decoder_input):
            return lambda: model(input_ids=source, attention_mask=mask, decoder_input_ids=decoder_input,
                                 use_cache=False)

        def generate(model, source=source, mask=mask, batch=batch):
            def call():
                out = model.generate(input_ids=source, attention_mask=mask, min_new_tokens=new_tokens,
                                     max_new_tokens=new_tokens, num_beams=1, do_sample=False, use_cache=True)
                assert out.shape == (batch, new_tokens + 1), out.shape  # start token + exactly N
                return out
            return call

        result.append((f"forward B={batch}", "forward", batch, tgt_len, forward))
        result.append((f"generate B={batch}", "generate", batch, new_tokens, generate))
    return sorted(result, key=lambda w: (w[1] != "forward", w[2]))


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny model (d_model 64, 2+2 layers, vocab 1000), ranks 8,16, batch 1,2, one repeat")
    ap.add_argument("--ranks", help=f"comma-separated ranks (default {FULL['ranks']})")
    ap.add_argument("--batch-sizes", help=f"comma-separated batch sizes (default {FULL['batch_sizes']})")
    ap.add_argument("--src-len", type=int, help=f"source tokens per sentence (default {FULL['src_len']})")
    ap.add_argument("--tgt-len", type=int, help=f"target tokens, teacher-forced (default {FULL['tgt_len']})")
    ap.add_argument("--new-tokens", type=int, help=f"tokens generated per sentence (default {FULL['new_tokens']})")
    ap.add_argument("--repeats", type=int, help=f"timed rounds over all models; medians reported "
                                                f"(default {FULL['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"untimed calls per model and workload (default {FULL['warmup']})")
    ap.add_argument("--min-time", type=float, help=f"each timing repeats the call for at least this many "
                                                   f"seconds (default {FULL['min_time']})")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--json", metavar="PATH", help="also write every raw timing and FLOP count to PATH")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")]
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--ranks and --batch-sizes take comma-separated whole numbers, got {args.ranks!r} "
                 f"and {args.batch_sizes!r}")
    for name in ("src_len", "tgt_len", "new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.batch_sizes) < 1:
        ap.error(f"--batch-sizes must all be at least 1, got {args.batch_sizes}")
    return args


def main(argv=None):
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    model_config = QUICK_MODEL if args.quick else FULL_MODEL
    if max(args.src_len, args.tgt_len, args.new_tokens + 1) > model_config["max_position_embeddings"]:
        sys.exit(f"error: lengths {args.src_len}/{args.tgt_len}/{args.new_tokens} exceed the model's "
                 f"{model_config['max_position_embeddings']} positions; use shorter --src-len/--tgt-len/--new-tokens")

    # model
    torch.manual_seed(0)
    config = MarianConfig(**model_config)
    dense = MarianMTModel(config).eval()
    dense_params = count_parameters(dense)
    rss_dense = rss_mb()

    # decompose (timed: the "Cost" section)
    models, cost = {"dense": dense}, {}
    for rank in args.ranks:
        model = copy.deepcopy(dense)
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            ranks = decompose_(model, [], rank, svd="auto")
        except DecompositionError as error:
            sys.exit(f"error: {error}; choose smaller --ranks")
        cost[rank] = {"decompose_seconds": time.perf_counter() - start, "layers": len(ranks),
                      "rss_mb_after": rss_mb()}
        models[f"rank {rank}"] = model.eval()
        progress(f"decompose_ rank {rank}: {cost[rank]['decompose_seconds']:.1f} s")
    names = list(models)
    params = {name: count_parameters(m) for name, m in models.items()}

    print(f"MarianMTModel d_model {config.d_model}, {config.encoder_layers}+{config.decoder_layers} layers, "
          f"ffn {config.encoder_ffn_dim}, vocab {config.vocab_size}, random weights; "
          f"{len(default_targets(dense))} linears factorized per copy; source {args.src_len} / target "
          f"{args.tgt_len} tokens, {args.new_tokens} generated; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds, "
          f"load average {load_before:.1f} at start\n")
    if load_before > (os.cpu_count() or 1) - args.threads + 0.5:
        print(f"Note: load average {load_before:.1f} on {os.cpu_count()} cores: other work competes for the "
              f"{args.threads} thread(s) asked for; every time below is inflated and only same-run ratios "
              f"mean anything (with 2+ threads on busy cores, OpenMP barriers stall each op; try --threads 1).\n")
    print("| model | params | % of dense |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {params[name] / 1e6:.1f}M | {pct(params[name], dense_params)} |")
    print()

    # warm up, and pick the calls per timing so that each lasts --min-time
    jobs = workloads(config, args.batch_sizes, args.src_len, args.tgt_len, args.new_tokens)
    calls, times = {}, {label: {name: [] for name in names} for label, *_ in jobs}
    with torch.inference_mode():
        for label, _, _, _, make in jobs:
            for name in names:
                fn = make(models[name])
                for _ in range(args.warmup):
                    fn()
            once = seconds_per_call(make(dense), 1)
            calls[label] = max(1, round(args.min_time / once)) if args.min_time > 0 else 1

            progress(f"warmed up {label}: {calls[label]} call(s) per timing, dense {1e3 * once:.0f} ms per call")

        # timed rounds: every model in each round, in rotating order, so drift hits all alike
        for round_ in range(args.repeats):
            progress(f"round {round_ + 1}/{args.repeats}")
            for label, _, _, _, make in jobs:
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    times[label][name].append(seconds_per_call(make(models[name]), calls[label]))

    # report
    print("| workload | model | time (ms) | speedup | FLOP-predicted | measured/predicted | GMAC | GFLOP/s "
          "| undecomposed share of dense (lm_head + attn) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for label, mode, batch, tokens, _ in jobs:
        dense_macs = predicted_macs(dense, config, batch, args.src_len, tokens, mode)
        fixed = dense_macs["lm_head"] + dense_macs["attention"]
        for name in names:
            macs = predicted_macs(models[name], config, batch, args.src_len, tokens, mode)
            median = statistics.median(times[label][name])
            ratios = [d / t for d, t in zip(times[label]["dense"], times[label][name])]
            speedup = statistics.median(ratios)
            predicted = dense_macs["total"] / macs["total"]
            results.append({"workload": label, "mode": mode, "batch": batch, "tokens": tokens, "model": name,
                            "params": params[name], "calls_per_timing": calls[label],
                            "seconds": times[label][name], "median_seconds": median, "speedup": speedup,
                            "predicted_speedup": predicted, "macs": macs, "ceiling": dense_macs["total"] / fixed})
            share = (f"{pct(fixed, dense_macs['total'])} ({pct(dense_macs['lm_head'], dense_macs['total'])}"
                     f" + {pct(dense_macs['attention'], dense_macs['total'])}), ceiling "
                     f"{dense_macs['total'] / fixed:.2f}×")
            print(f"| {label} | {name} | {1e3 * median:.1f} | {speedup:.2f}× | {predicted:.2f}× "
                  f"| {100 * speedup / predicted:.0f}% | {macs['total'] / 1e9:.3g} "
                  f"| {2 * macs['total'] / median / 1e9:.3g} | {share} |")
    print()

    # targets (reported, not asserted)
    print(f"Targets (reported, not asserted): generation ≥{TARGET_GEN_SPEEDUP}× faster than dense (the paper's "
          f"figure); measured speedup ≥{100 * TARGET_EFFICIENCY:.0f}% of the FLOP prediction.")
    for r in results:
        if r["model"] == "dense":
            continue
        efficiency = r["speedup"] / r["predicted_speedup"]
        marks = f"{r['speedup']:.3f}× {'✓' if r['speedup'] >= TARGET_GEN_SPEEDUP else '✗'} speedup" \
            if r["mode"] == "generate" else f"{r['speedup']:.3f}× speedup"
        print(f"- {r['workload']:<14} {r['model']:<9} {marks}, {100 * efficiency:.0f}% of predicted "
              f"{'✓' if efficiency >= TARGET_EFFICIENCY else '✗'}")
    print()

    # cost
    print(f"Cost: decompose_ (svd 'auto', {torch.get_num_threads()} threads) on the full model, one run each; "
          f"resident memory with the dense model only: {rss_dense:.0f} MB")
    print("| rank | layers | decompose_ time (s) | RSS after (MB) |")
    print("|---:|---:|---:|---:|")
    for rank, c in cost.items():
        print(f"| {rank} | {c['layers']} | {c['decompose_seconds']:.2f} | {c['rss_mb_after']:.0f} |")
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()[0]
    print(f"\nPeak RSS {peak_rss_mb():.0f} MB; total {elapsed:.0f} s; load average {load_after:.1f} at end")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "model_config": model_config, "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "params": params,
            "results": results, "cost": cost, "rss_mb_dense": rss_dense, "peak_rss_mb": peak_rss_mb(),
            "seconds": elapsed, "load_average": [load_before, load_after]}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
