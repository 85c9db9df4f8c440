"""Where translation models are deployed: size on disk, BLEU/chrF and speed of the teacher and its
compressed student in PyTorch, in ONNX Runtime (this tool's export, float32 and int8) and, for the
dense teacher, in CTranslate2 (float32 and int8), the runtime users pick instead.

    python -m benchmarks.bench_deploy shipped --student outputs/student-50   # shipped teacher, real pairs
    python -m benchmarks.bench_deploy opus --opus-threads 1                    # opus-mt-en-de shape, random weights
    python -m benchmarks.bench_deploy opus --quick                             # smoke test: tiny models, seconds

``shipped``: the shipped teacher (``models/teacher-en-de``) and a student compressed from it
(``--student``, a folder written by ``compress_model.py``) translate ``--pairs`` greedily
(max 128 new tokens); BLEU/chrF on all pairs, translations at batch 32 and 1, "same" = how many
of them equal the PyTorch model's. ``opus``: a MarianMTModel of opus-mt-en-de's shape (d_model 512,
6+6 layers, 8 heads, ffn 2048, vocabulary 58,101, tied embeddings) with random weights, and a
student factorized from it at about 50% of its parameters (every linear and the shared embedding
at half its size: attention rank 128, feed-forward rank 205, embedding rank 256); each translates
64 random sources of 16 tokens (8 of them at batch 1) into exactly 32 tokens (EOS kept out until
then), so every system does the same work, at 1 and at 2 threads (``--opus-threads``); and ONNX
Runtime's profiler splits one decoder step (batch 32, 16 cached positions, 1 thread) by operator.
Speed is sentences per second, the median over ``--rounds`` interleaved rounds (each round times
every system once, in rotating order), with the threads pinned in every runtime. Sizes are the weight
files (model.safetensors or a factorized model's model.low_rank.safetensors; encoder.onnx +
decoder.onnx + weights.bin; CTranslate2's model.bin), tokenizers aside. CTranslate2 (``pip install
ctranslate2``) rows are left out when it is not installed.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mdcompress.data import read_pairs  # noqa: E402
from mdcompress.evaluation import corpus_scores  # noqa: E402
from matrix_decomposition import (  # noqa: E402
    count_parameters, decompose_, load_compressed_model, save_compressed_model, weights_file,
)
from mdcompress.onnx_export import export  # noqa: E402
from mdcompress.process import quiet_transformers  # noqa: E402
from mdcompress.translate import OnnxTranslator, TorchTranslator, folder_mb  # noqa: E402

SHARED_DEV = REPO.parent / "shared" / "data" / "tatoeba_en_de" / "dev.csv"


class System:
    """One model in one runtime: ``generate(list of token-id lists)`` → token-id lists."""

    def __init__(self, name: str, params: int, size_mb: float, generate, tokenizer):
        self.name, self.params, self.size_mb, self.generate, self.tokenizer = name, params, size_mb, generate, tokenizer


def padded(batch: list[list[int]], pad: int):
    ids = np.full((len(batch), max(map(len, batch))), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(batch):
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    return ids, mask


def ours(name: str, translator, params: int, size: float, max_new: int, min_new: int) -> System:
    pad = translator.tokenizer.pad_token_id
    return System(name, params, size, lambda batch: translator.generate(
        *padded(batch, pad), max_new_tokens=max_new, min_new_tokens=min_new), translator.tokenizer)


def ctranslate2_systems(model_dir: Path, work: Path, tokenizer, params: int, threads: int, max_new: int,
                        min_new: int) -> list[System]:
    try:
        import ctranslate2
    except ImportError:
        print("ctranslate2 is not installed: its rows are left out (pip install ctranslate2)", file=sys.stderr)
        return []
    systems = []
    for quantization in ("float32", "int8"):
        out = work / f"ct2-{quantization}"
        if not out.exists():
            ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(out), quantization=quantization)
        translator = ctranslate2.Translator(str(out), device="cpu", inter_threads=1, intra_threads=threads)

        def generate(batch, translator=translator):
            results = translator.translate_batch([tokenizer.convert_ids_to_tokens(s) for s in batch], beam_size=1,
                                                 max_decoding_length=max_new, min_decoding_length=min_new)
            return [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]

        systems.append(System(f"CTranslate2 teacher {quantization}", params,
                              round((out / "model.bin").stat().st_size / 2**20, 3), generate, tokenizer))
    return systems


def build_systems(teacher_dir: Path, student_dir: Path, work: Path, threads: int, max_new: int, min_new: int,
                  ct2: bool = True) -> list[System]:
    torch.set_num_threads(threads)
    systems = []
    for role, folder in (("teacher", teacher_dir), ("student", student_dir)):
        pytorch = TorchTranslator.load(folder, threads)
        params = count_parameters(pytorch.model)
        systems.append(ours(f"PyTorch {role}", pytorch, params, round(weights_file(folder).stat().st_size
                                                                      / 2**20, 3), max_new, min_new))
        for precision in ("float32", "int8"):
            out = work / f"onnx-{role}-{precision}"
            if not out.exists():
                export(folder, out, precision)
            systems.append(ours(f"ONNX Runtime {role} {precision}", OnnxTranslator(out, threads), params,
                                folder_mb(out), max_new, min_new))
    if ct2:
        systems[3:3] = ctranslate2_systems(teacher_dir, work, systems[0].tokenizer, systems[0].params, threads,
                                           max_new, min_new)
    return systems


def timed_rounds(systems: list[System], inputs: dict[int, list[list[int]]], rounds: int) -> dict:
    """{system: {batch size: (sentences per second, outputs of the last round)}}, medians over rounds."""
    times = {s.name: {b: [] for b in inputs} for s in systems}
    outputs = {s.name: {} for s in systems}
    for system in systems:  # warm-up: first calls allocate and plan
        system.generate(inputs[max(inputs)][:2])
    for r in range(rounds):
        for i in range(len(systems)):
            system = systems[(i + r) % len(systems)]
            for batch_size, sources in inputs.items():
                order = sorted(range(len(sources)), key=lambda k: len(sources[k]))
                result = [None] * len(sources)
                start = time.perf_counter()
                for at in range(0, len(order), batch_size):
                    chunk = order[at:at + batch_size]
                    for k, out in zip(chunk, system.generate([sources[k] for k in chunk])):
                        result[k] = out
                times[system.name][batch_size].append(time.perf_counter() - start)
                outputs[system.name][batch_size] = result
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {s.name: {b: (len(inputs[b]) / statistics.median(times[s.name][b]), outputs[s.name][b]) for b in inputs}
            for s in systems}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" if fmt == "s" else "---:" for _, _, fmt in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shipped(args, work: Path) -> dict:
    pairs = read_pairs(args.pairs)[args.skip:][:args.limit]
    teacher_dir, student_dir = Path(args.teacher), Path(args.student)
    results = {"section": "shipped", "pairs": f"{args.pairs} [{args.skip}:{args.skip + len(pairs)}]",
               "threads": args.threads, "rounds": args.rounds, "systems": []}
    systems = build_systems(teacher_dir, student_dir, work, args.threads, 128, 0)
    tokenizer = systems[0].tokenizer
    sources = tokenizer([s for s, _ in pairs], truncation=True, max_length=128)["input_ids"]
    speed = timed_rounds(systems, {32: sources, 1: sources[:args.batch1]}, args.rounds)
    references = [t for _, t in pairs]
    texts = {s.name: tokenizer.batch_decode(speed[s.name][32][1], skip_special_tokens=True) for s in systems}
    base = speed["PyTorch teacher"][32][0]
    for s in systems:
        reference = "PyTorch student" if "student" in s.name else "PyTorch teacher"
        results["systems"].append({
            "system": s.name, "params": s.params, "size_mb": s.size_mb,
            **corpus_scores(texts[s.name], references),
            "same": sum(a == b for a, b in zip(texts[s.name], texts[reference])),
            "sent_per_s_b1": round(speed[s.name][1][0], 1), "sent_per_s_b32": round(speed[s.name][32][0], 1),
            "speedup_b32": round(speed[s.name][32][0] / base, 2)})
    return results


def opus_models(work: Path, quick: bool):
    """A random dense model of opus-mt-en-de's shape (or a tiny one) and its ~50% student, saved."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    from scripts.train_teacher import build_tokenizer

    dense_dir, student_dir = work / "dense", work / "student"
    if weights_file(student_dir) is not None:
        return dense_dir, student_dir
    if quick:
        d, layers, heads, ffn, vocab, ranks = 32, 2, 2, 64, 1000, (8, 10, 16)
    else:
        d, layers, heads, ffn, vocab, ranks = 512, 6, 8, 2048, 58101, (128, 205, 256)
    spm_dir = work / "spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(REPO / "data" / "tatoeba_en_de" / "train.csv")[:2000]
    build_tokenizer(pairs, spm_dir, 500, seed=0, hard_vocab_limit=False)
    pieces = json.loads((spm_dir / "vocab.json").read_text())
    pad = pieces.pop("<pad>")
    assert pad == len(pieces)
    for i in range(len(pieces), vocab - 1):  # filler entries up to the real vocabulary's size
        pieces[f"▁tok{i}"] = i
    pieces["<pad>"] = vocab - 1
    (spm_dir / "vocab.json").write_text(json.dumps(pieces, ensure_ascii=False))
    spm = str(spm_dir / "spm.model")
    tokenizer = MarianTokenizer(source_spm=spm, target_spm=spm, vocab=str(spm_dir / "vocab.json"))
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers,
                          encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                          decoder_ffn_dim=ffn, max_position_embeddings=512, pad_token_id=vocab - 1, eos_token_id=0,
                          decoder_start_token_id=vocab - 1, forced_eos_token_id=0, activation_function="swish",
                          scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab - 1].zero_()  # Marian's zero <pad> row (see train_teacher.py)
    model.generation_config.bad_words_ids = [[vocab - 1]]
    save_compressed_model(model, dense_dir, tokenizer)
    attention, feed_forward, embedding = ranks
    k_info = {name: (feed_forward if ".fc" in name else attention) for name in _linear_keys(model)}
    k_info["model.shared.weight"] = embedding
    student = copy.deepcopy(model)
    decompose_(student, list(k_info), k_info=k_info)
    save_compressed_model(student, student_dir, tokenizer)
    return dense_dir, student_dir


def _linear_keys(model) -> list[str]:
    return [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name]


def step_profile(folder: Path, batch: int, past: int, source: int, threads: int, steps: int = 20) -> dict:
    """Where one decoding step of an ONNX export goes: ms per step and the share of each operator
    type (ONNX Runtime's own profiler, after its graph optimizations), cache of ``past`` positions."""
    import onnxruntime as ort

    info = json.loads((folder / "onnx_export.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling, options.profile_file_prefix = True, str(folder.parent / f"profile-{folder.name}")
    session = ort.InferenceSession(str(folder / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(0)
    feed = {"input_ids": np.full((batch, 1), 5, np.int64), "attention_mask": np.ones((batch, source), np.int64)}
    for names, length in ((info["past"], past), (info["cross"], source)):
        for name in names:
            feed[name] = generator.standard_normal((batch, info["heads"], length, info["head_dim"]), np.float32)
    for _ in range(3):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(steps):
        session.run(None, feed)
    ms = 1000 * (time.perf_counter() - start) / steps
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] = by_op.get(event["args"]["op_name"], 0) + event["dur"]
    total = sum(by_op.values())
    return {"ms_per_step": round(ms, 2), "share": {op: round(t / total, 3) for op, t in
                                                    sorted(by_op.items(), key=lambda kv: -kv[1])}}


def opus(args, work: Path) -> dict:
    dense_dir, student_dir = opus_models(work, args.quick)
    dense = load_compressed_model(dense_dir)
    results = {"section": "opus", "rounds": args.rounds, "systems": [],
               "dense_params": count_parameters(dense), "student_params": count_parameters(load_compressed_model(student_dir))}
    generator = np.random.default_rng(0)
    vocab = dense.config.vocab_size
    sentences = 16 if args.quick else 64
    sources = [[*generator.integers(2, vocab - 1, 15).tolist(), 0] for _ in range(sentences)]
    length = 8 if args.quick else 32
    for threads in args.opus_threads:
        systems = build_systems(dense_dir, student_dir, work, threads, length, length)
        speed = timed_rounds(systems, {32: sources, 1: sources[:8 if not args.quick else 2]}, args.rounds)
        base = {b: speed["ONNX Runtime teacher float32"][b][0] for b in (1, 32)}
        ct2 = speed.get("CTranslate2 teacher int8")
        for s in systems:
            lengths = {len(o) for o in speed[s.name][32][1]}
            assert lengths == {length}, (s.name, lengths)  # the same work for every system
            results["systems"].append({
                "system": s.name.replace("teacher", "dense"), "threads": threads, "params": s.params,
                "size_mb": s.size_mb, "sent_per_s_b1": round(speed[s.name][1][0], 2),
                "sent_per_s_b32": round(speed[s.name][32][0], 2),
                "vs_onnx_dense_b32": round(speed[s.name][32][0] / base[32], 2),
                "vs_ct2_int8_b32": round(speed[s.name][32][0] / ct2[32][0], 2) if ct2 else None})
    results["step_profile"] = {  # one decoder step at batch 32 with 16 cached positions, 1 thread
        f"{role} {precision}": step_profile(work / f"onnx-{role}-{precision}", 32, 16, 16, 1)
        for role in ("teacher", "student") for precision in ("float32", "int8")}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", nargs="?", choices=["shipped", "opus"], default="shipped")
    parser.add_argument("--teacher", default=str(REPO / "models" / "teacher-en-de"))
    parser.add_argument("--student", help="a folder written by compress_model.py from the teacher (shipped)")
    parser.add_argument("--pairs", default=str(SHARED_DEV if SHARED_DEV.is_file() else
                                               REPO / "data" / "tatoeba_en_de" / "eval.csv"),
                        help="CSV of source_text,target_text (default: the 1,000 dev pairs after the shipped eval.csv)")
    parser.add_argument("--skip", type=int, default=1000 if SHARED_DEV.is_file() else 0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch1", type=int, default=200, help="sentences translated one at a time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--opus-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the exports and models (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, few sentences, one round")
    args = parser.parse_args(argv)
    quiet_transformers()
    if args.quick:
        args.rounds, args.limit, args.batch1, args.opus_threads = 1, 24, 8, [1]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.section == "shipped":
        if not args.student:
            parser.error("shipped needs --student (a folder written by compress_model.py from --teacher)")
        results = shipped(args, work)
        columns = [("system", "system", "s"), ("params", "params", ","), ("size_mb", "MB on disk", ".2f"),
                   ("bleu", "BLEU", ".2f"), ("chrf", "chrF", ".2f"), ("same", "same as PyTorch", "d"),
                   ("sent_per_s_b1", "sent/s batch 1", ".1f"), ("sent_per_s_b32", "sent/s batch 32", ".1f"),
                   ("speedup_b32", "× PyTorch teacher (b32)", ".2f")]
    else:
        results = opus(args, work)
        columns = [("system", "system", "s"), ("threads", "threads", "d"), ("params", "params", ","),
                   ("size_mb", "MB on disk", ".1f"), ("sent_per_s_b1", "sent/s batch 1", ".2f"),
                   ("sent_per_s_b32", "sent/s batch 32", ".2f"), ("vs_onnx_dense_b32", "× ONNX dense (b32)", ".2f"),
                   ("vs_ct2_int8_b32", "× CT2 int8 dense (b32)", ".2f")]
    print(table(results["systems"], columns))
    for name, profile in results.get("step_profile", {}).items():
        top = ", ".join(f"{op} {100 * share:.0f}%" for op, share in list(profile["share"].items())[:6])
        print(f"decoder step, {name.replace('teacher', 'dense')}: {profile['ms_per_step']:.1f} ms ({top})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
