"""Time ``decompose_`` on an opus-mt-en-de-shaped MarianMTModel and compare the SVD methods.

The model has random weights (no download): d_model 512, 6+6 layers, 8 heads, ffn 2048, vocab
58101, i.e. 96 decomposable linears (72 of 512×512, 12 of 2048×512, 12 of 512×2048). For each
rank and svd method it reports the median wall time of ``decompose_(model, [], rank, svd=…)``
over every default layer, and the relative truncation error sqrt(Σ‖W − B'C'‖²_F / Σ‖W‖²_F):

- on the random-init weights themselves, whose spectrum is flat (the worst case for the
  randomized SVD, and for truncation in general);
- on matrices of the same shapes with a decaying spectrum s_i = i^-0.5 (closer to trained
  weights), one per shape, weighted by how many layers have that shape.

    python -m benchmarks.bench_decompose                # ~3 min of CPU time
    python -m benchmarks.bench_decompose --threads 1    # the same on cores busy with other jobs
    python -m benchmarks.bench_decompose --quick        # smoke test: small model, one repeat, seconds

Two threads on cores another job is using make LAPACK stall (10–100× slower): use --threads 1 then.
"""

import argparse
import copy
import statistics
import time
from collections import Counter

import torch
from transformers import MarianConfig, MarianMTModel

from benchmarks import write_json
from matrix_decomposition import count_parameters, decompose_, default_targets, truncated_svd

FULL = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
            decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=58101)
QUICK = dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=1000)
METHODS = ("exact", "lowrank", "auto")


def decaying_matrix(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """U·diag(s)·Vᵀ (n×d) with random orthonormal U, V and s_i = i^-0.5."""
    k = min(n, d)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))  # (n, k)
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=generator))  # (d, k)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5  # (k,)
    return (u * s) @ v.T


def decaying_errors(shapes: Counter, ranks: list[int]) -> dict[tuple[int, str], float]:
    """(rank, method) → relative truncation error over one decaying matrix per shape, layer-weighted."""
    generator = torch.Generator().manual_seed(0)
    matrices = {shape: decaying_matrix(*shape, generator) for shape in shapes}
    errors = {}
    for rank in ranks:
        for method in METHODS:
            torch.manual_seed(0)
            num = den = 0.0
            for shape, w in matrices.items():
                u, s, vh = truncated_svd(w, rank, method)  # (n, r), (r,), (r, d)
                num += shapes[shape] * torch.linalg.matrix_norm(w - (u * s) @ vh).item() ** 2
                den += shapes[shape] * torch.linalg.matrix_norm(w).item() ** 2
            errors[rank, method] = (num / den) ** 0.5
    return errors


def time_decompose(base: MarianMTModel, rank: int, method: str, repeats: int) -> tuple[float, float]:
    """Median seconds of decompose_ over every default layer, and the relative truncation error."""
    originals = {name: base.get_submodule(name).weight for name in default_targets(base)}
    seconds = []
    for _ in range(repeats):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        start = time.perf_counter()
        decompose_(model, [], rank, svd=method)
        seconds.append(time.perf_counter() - start)
    with torch.no_grad():
        num = sum(torch.linalg.matrix_norm(w - model.get_submodule(n).weight) ** 2 for n, w in originals.items())
        den = sum(torch.linalg.matrix_norm(w) ** 2 for w in originals.values())
    return statistics.median(seconds), (num / den).sqrt().item()


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, ranks 8,16, one repeat (smoke test)")
    ap.add_argument("--ranks", default="32,64,128",
                    help="comma-separated ranks; 512×512 layers save nothing above 255 (default: 32,64,128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--json", help="also write the rows (and the model's shapes) here")
    args = ap.parse_args(argv)
    ranks = [8, 16] if args.quick else [int(r) for r in args.ranks.split(",")]
    repeats = 1 if args.quick else args.repeats

    # model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = MarianConfig(**(QUICK if args.quick else FULL), max_position_embeddings=512,
                          pad_token_id=0, decoder_start_token_id=0)
    base = MarianMTModel(config).eval()
    targets = default_targets(base)
    shapes = Counter(tuple(base.get_submodule(name).weight.shape) for name in targets)
    print(f"MarianMTModel d_model {config.d_model}, {config.encoder_layers}+{config.decoder_layers} layers, "
          f"{count_parameters(base) / 1e6:.1f}M params; {len(targets)} linears: "
          + ", ".join(f"{c}× {n}×{d}" for (n, d), c in shapes.items())
          + f"; torch {torch.__version__}, {args.threads} threads, median of {repeats}\n")

    # decaying spectrum (also warms up LAPACK before the timings)
    decaying = decaying_errors(shapes, ranks)

    # timings and errors on the random-init weights
    print("| rank | svd | decompose_ time (s) | vs exact | rel. error, random init | rel. error, decaying spectrum |")
    print("|---:|---|---:|---:|---:|---:|")
    rows = []
    for rank in ranks:
        for method in METHODS:
            seconds, error = time_decompose(base, rank, method, repeats)
            if method == "exact":
                exact_seconds = seconds
            print(f"| {rank} | {method} | {seconds:.2f} | {exact_seconds / seconds:.1f}× | {error:.4f} "
                  f"| {decaying[rank, method]:.4f} |")
            rows.append({"rank": rank, "svd": method, "seconds": seconds, "vs_exact": exact_seconds / seconds,
                         "error_random_init": error, "error_decaying_spectrum": decaying[rank, method]})
    if args.json:
        write_json(args.json, {"d_model": config.d_model, "linears": len(targets), "threads": args.threads,
                               "repeats": repeats, "rows": rows})


if __name__ == "__main__":
    main()
