"""Where translation models are deployed: size on disk, BLEU/chrF and speed of the teacher and its
compressed student in PyTorch, in ONNX Runtime (this tool's export, float32 and int8) and, for the
dense teacher, in CTranslate2 (float32 and int8), the runtime users pick instead.

    python -m benchmarks.bench_deploy shipped --student outputs/student-50   # shipped teacher, real pairs
    python -m benchmarks.bench_deploy opus --opus-threads 1                    # opus-mt-en-de shape, random weights
    python -m benchmarks.bench_deploy opus --quick                             # smoke test: tiny models, seconds
    python -m benchmarks.bench_deploy shapes --shape opus tc-big nllb --threads 1   # three real shapes, random weights
    python -m benchmarks.bench_deploy shapes --quick                           # the same layouts, tiny
    python -m benchmarks.bench_deploy shapes --shape nllb --trim-kept 100000  # and NLLB trimmed to 100,000 tokens

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

``shapes``: the same comparison at three real architectures (``SHAPES``: opus-mt-en-de;
opus-mt-tc-big's d_model 1024 with separate, untied source and target vocabularies; NLLB-200
distilled 600M, an M2M100), random weights, each with a student at about half its parameters
(every linear of the layers, every token table and an untied output projection at the rank that
halves it, ``half_rank``). Rows: PyTorch, ONNX Runtime int8 and CTranslate2 int8 of the dense
model, ONNX Runtime int8 of the student, and the float32 rows of both runtimes where the dense
model's float32 weights stay under ``--float32-limit-gb`` (all systems of a shape are held at once).
A row a runtime cannot make (an export the exporter refuses, a model CTranslate2 cannot convert) is
kept with its one-line reason instead. Beside each shape, what making the student cost here: the
factorization (``decompose_``, ``svd`` auto), each export, and the rank-sensitivity measurement that
``target_ratio`` runs (``sensitivity_cost``: timed in part, extrapolated). Models, exports and
costs are kept in ``--work``, so a second run at other ``--threads`` reuses them; the JSON is
rewritten after each shape.

``shapes --trim-kept N``: also the model with its vocabulary trimmed to N tokens, as
``trim_vocabulary`` trims it (``vocabulary.trim_model_``): the named special tokens, the two language
codes of ``LANGUAGE_PAIR`` and ids drawn at random up to N (random weights: how many rows matter, not
which). Two more rows, both int8 in ONNX Runtime and timed in the same rounds: the trimmed dense model,
and a ~50% student factorized from it (every linear of the layers and the trimmed embedding at half
its size, ``student_ranks``). They are fed the same sources renumbered to the kept ids (a dropped id
as ``<unk>``), so every system does the same work. Shapes with one vocabulary only (opus, nllb).
"""

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mdcompress.data import read_pairs  # noqa: E402
from mdcompress.errors import ExportError  # noqa: E402
from mdcompress.evaluation import corpus_scores  # noqa: E402
from mdcompress.files import write_json_atomic  # noqa: E402
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


# ---------------------------------------------------------------------------------------------
# shapes: three real architectures at random weights, and what producing each student costs


@dataclass(frozen=True)
class Shape:
    """The layout of a real model: its family, sizes and vocabularies (``target_vocab`` None: one
    vocabulary, the embedding shared by encoder and decoder and tied to the output projection)."""

    family: str  # "marian" or "m2m_100"
    d_model: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    target_vocab: int | None = None
    activation: str = "relu"
    max_positions: int = 1024

    def tiny(self) -> "Shape":
        """The same layout at d_model 16, 2+2 layers: what --quick runs."""
        return Shape(self.family, 16, 2, 2, 32, 1200, None if self.target_vocab is None else 1100, self.activation, 64)


SHAPES = {  # the real models' config.json values (Hugging Face hub)
    "opus": Shape("marian", 512, 6, 8, 2048, 58_101, activation="swish", max_positions=512),  # Helsinki-NLP/opus-mt-en-de
    # Helsinki-NLP/opus-mt-tc-big-*: d_model 1024, 16 heads, ffn 4096, relu, vocabularies of about 57k
    # (56,973 in opus-mt-tc-big-hu-en); laid out here with separate, untied source and target vocabularies
    "tc-big": Shape("marian", 1024, 6, 16, 4096, 56_973, 56_973),
    # facebook/nllb-200-distilled-600M: M2M100, pre-norm, relu, scaled embedding, tied, 256,206 tokens
    "nllb": Shape("m2m_100", 1024, 12, 16, 4096, 256_206),
}
SHAPE_SETTINGS = {  # sentences at batch 32, at batch 1; tokens generated
    "opus": (64, 8, 32), "tc-big": (32, 4, 32), "nllb": (32, 4, 32)}


def half_rank(out_features: int, in_features: int) -> int:
    """The rank at which a factorized n×d matrix holds half its weights: r·(n+d) = n·d/2."""
    return round(out_features * in_features / (2 * (out_features + in_features)))


def _marian_vocab(spm_dir: Path, size: int, name: str) -> Path:
    """``spm_dir/vocab.json`` grown with filler pieces to ``size`` entries, ``<pad>`` last, saved as ``name``."""
    pieces = json.loads((spm_dir / "vocab.json").read_text())
    pad = pieces.pop("<pad>")
    assert pad == len(pieces)
    for i in range(len(pieces), size - 1):
        pieces[f"▁tok{i}"] = i
    pieces["<pad>"] = size - 1
    (spm_dir / name).write_text(json.dumps(pieces, ensure_ascii=False))
    return spm_dir / name


def shape_tokenizer(shape: Shape, work: Path):
    """A tokenizer of ``shape``'s kind on a small sentencepiece model trained here; the vocabulary
    files are grown to the model's size (Marian) or the model is larger than the tokenizer (NLLB's
    ids past the tokenizer are never decoded to text here)."""
    from transformers import AutoTokenizer, MarianTokenizer

    from scripts.train_teacher import build_tokenizer

    spm_dir = work / "spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(read_pairs(REPO / "data" / "tatoeba_en_de" / "train.csv")[:2000], spm_dir, 500, seed=0,
                    hard_vocab_limit=False)
    spm = str(spm_dir / "spm.model")
    if shape.family == "m2m_100":
        folder = work / "nllb-tokenizer"
        folder.mkdir(exist_ok=True)
        shutil.copy(spm, folder / "sentencepiece.bpe.model")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "NllbTokenizer", "additional_special_tokens": ["eng_Latn", "deu_Latn"]}))
        return AutoTokenizer.from_pretrained(folder)
    if shape.target_vocab is None:
        return MarianTokenizer(source_spm=spm, target_spm=spm, vocab=str(_marian_vocab(spm_dir, shape.vocab, "v.json")))
    return MarianTokenizer(source_spm=spm, target_spm=spm, separate_vocabs=True,
                           vocab=str(_marian_vocab(spm_dir, shape.vocab, "source.json")),
                           target_vocab_file=str(_marian_vocab(spm_dir, shape.target_vocab, "target.json")))


def shape_model(shape: Shape):
    """A model of ``shape`` with random weights (seed 0), in evaluation mode."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, MarianConfig, MarianMTModel

    torch.manual_seed(0)
    sizes = dict(d_model=shape.d_model, encoder_layers=shape.layers, decoder_layers=shape.layers,
                 encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads, encoder_ffn_dim=shape.ffn,
                 decoder_ffn_dim=shape.ffn, activation_function=shape.activation, scale_embedding=True)
    if shape.family == "m2m_100":
        config = M2M100Config(vocab_size=shape.vocab, max_position_embeddings=shape.max_positions, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, decoder_start_token_id=2, tie_word_embeddings=True, **sizes)
        return M2M100ForConditionalGeneration(config).eval()
    target = shape.target_vocab or shape.vocab
    separate = shape.target_vocab is not None
    config = MarianConfig(vocab_size=shape.vocab, decoder_vocab_size=target, max_position_embeddings=shape.max_positions,
                          pad_token_id=target - 1, eos_token_id=0, decoder_start_token_id=target - 1,
                          forced_eos_token_id=0, share_encoder_decoder_embeddings=not separate,
                          tie_word_embeddings=not separate, **sizes)
    model = MarianMTModel(config).eval()
    with torch.no_grad():  # Marian's zero <pad> rows (see train_teacher.py)
        for embedding in {id(e): e for e in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens)}.values():
            embedding.weight[-1].zero_()
    model.generation_config.bad_words_ids = [[target - 1]]
    return model


def student_ranks(model) -> dict[str, int]:
    """{state-dict key: rank} halving every linear of the layers, every token embedding and an
    untied output projection (tied ones follow their embedding)."""
    from matrix_decomposition import canonical_name, word_embeddings

    embeddings = word_embeddings(model)
    ranks = {key: half_rank(*model.get_submodule(key.removesuffix(".weight")).weight.shape)
             for key in _linear_keys(model)}
    names = {id(m): name for name, m in model.named_modules()}
    for embedding in embeddings:
        ranks[canonical_name(model, f"{names[id(embedding)]}.weight")] = half_rank(*embedding.weight.shape)
    head = model.get_output_embeddings()
    if all(head.weight is not e.weight for e in embeddings):
        ranks[canonical_name(model, f"{names[id(head)]}.weight")] = half_rank(*head.weight.shape)
    return ranks


def svd_method(n: int, d: int, rank: int) -> str:
    """What ``truncated_svd``'s ``auto`` chooses for an n×d matrix at ``rank``."""
    return "lowrank" if min(n, d) >= 256 and rank <= min(n, d) // 4 else "exact"


def random_batches(model, pairs: int, batch_size: int, length: int = 16) -> list[dict]:
    """Calibration batches of random token ids (``pairs`` pairs of ``length`` tokens, EOS last)."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    source = model.get_encoder().embed_tokens.num_embeddings
    target = model.get_output_embeddings().weight.shape[0]
    batches = []
    for at in range(0, pairs, batch_size):
        b = min(batch_size, pairs - at)
        ids = torch.randint(4, source - 2, (b, length), generator=generator)
        labels = torch.randint(4, target - 2, (b, length), generator=generator)
        ids[:, -1] = labels[:, -1] = config.eos_token_id
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches



def _seconds(t: float) -> float:
    """A duration to 3 significant digits: a tiny model's milliseconds stay above zero."""
    return float(f"{t:.3g}")

def sensitivity_cost(model, names: list[str], samples: int, measured_pairs: int, batch_size: int = 32,
                     points: int = 8) -> dict:
    """What ``rank_allocation.sensitivity_errors`` costs for ``names`` on ``samples`` calibration
    pairs, timed on ``measured_pairs`` of them for one layer of each weight shape and extrapolated:
    its time is the reference pass plus, per layer, one SVD and ``points`` + 1 forward passes, and a
    forward pass costs in proportion to the pairs; so

        total = s·t_ref + Σ_shape count·(s·(t_layer − t_ref − t_svd) + t_svd),  s = samples / measured_pairs,

    t_ref the reference pass alone, t_layer one layer's call (its reference pass included), t_svd its SVD."""
    from matrix_decomposition import low_rank_factors, max_saving_rank
    from mdcompress.rank_allocation import sensitivity_errors

    batches = random_batches(model, measured_pairs, batch_size)
    sensitivity_errors(model, [], batches, points=points)  # warm-up: the first pass allocates
    start = time.perf_counter()
    sensitivity_errors(model, [], batches, points=points)
    t_ref = time.perf_counter() - start
    groups: dict[tuple, list[str]] = {}
    for name in names:
        weight = model.get_submodule(name).weight
        groups.setdefault((type(model.get_submodule(name)).__name__, *weight.shape), []).append(name)
    scale = samples / measured_pairs
    per_shape, total = {}, scale * t_ref
    for (kind, n, d), members in groups.items():
        start = time.perf_counter()
        sensitivity_errors(model, members[:1], batches, points=points)
        t_layer = time.perf_counter() - start
        start = time.perf_counter()
        low_rank_factors(model.get_submodule(members[0]).weight.detach(), max_saving_rank(n, d), "auto")
        t_svd = time.perf_counter() - start
        per_layer = scale * max(t_layer - t_ref - t_svd, 0.0) + t_svd
        per_shape[f"{kind} {n}x{d}"] = {"layers": len(members), "measured_s": _seconds(t_layer - t_ref),
                                        "svd_s": _seconds(t_svd), "per_layer_s": _seconds(per_layer)}
        total += len(members) * per_layer
    return {"calibration_samples": samples, "measured_pairs": measured_pairs, "points": points, "layers": len(names),
            "reference_s": _seconds(t_ref), "per_shape": per_shape, "extrapolated_s": _seconds(total),
            "load_average": os.getloadavg(),
            "method": "one layer of each weight shape timed on measured_pairs pairs; forward passes scaled by "
                      "calibration_samples / measured_pairs, SVDs not"}


def shape_models(name: str, shape: Shape, work: Path, samples: int, measured_pairs: int) -> tuple[Path, Path, dict]:
    """The dense model of ``shape`` and its ~50% student, saved under ``work`` (kept from an earlier
    run there), and what making the student cost: the factorization and the rank-sensitivity
    measurement (``sensitivity_cost``)."""
    dense_dir, student_dir, costs_file = work / "dense", work / "student", work / "costs.json"
    if weights_file(student_dir) is not None and costs_file.is_file():
        return dense_dir, student_dir, json.loads(costs_file.read_text())
    tokenizer = shape_tokenizer(shape, work)
    model = shape_model(shape)
    save_compressed_model(model, dense_dir, tokenizer)
    ranks = student_ranks(model)
    costs = {"threads": torch.get_num_threads(), "sensitivity": sensitivity_cost(model, [k.removesuffix(".weight") for k in ranks], samples,
                                             measured_pairs)}
    print(f"{name}: rank sensitivity measured in part, {costs['sensitivity']['extrapolated_s']:.0f} s extrapolated",
          file=sys.stderr, flush=True)
    methods = [svd_method(*model.get_submodule(k.removesuffix(".weight")).weight.shape, r) for k, r in ranks.items()]
    start = time.perf_counter()
    decompose_(model, list(ranks), k_info=ranks, svd="auto")  # in place: the dense model is saved already
    seconds = time.perf_counter() - start
    costs["factorization"] = {"svd": "auto", "seconds": round(seconds, 2), "layers": len(ranks),
                              "exact": methods.count("exact"), "lowrank": methods.count("lowrank"), "ranks": ranks}
    save_compressed_model(model, student_dir, tokenizer)
    write_json_atomic(costs_file, costs)
    return dense_dir, student_dir, costs


def timed_export(folder: Path, out: Path, precision: str) -> dict:
    """Export ``folder`` to ``out`` in ``precision`` unless done already: {"seconds"} or {"error"}."""
    record = out.parent / f"{out.name}.json"
    if record.is_file():
        return json.loads(record.read_text())
    start = time.perf_counter()
    try:
        export(folder, out, precision)
        result = {"seconds": round(time.perf_counter() - start, 1), "size_mb": folder_mb(out)}
    except ExportError as e:
        result = {"error": f"not exportable: {e}"}
    write_json_atomic(record, result)
    return result


def ct2_convert(model_dir: Path, out: Path, quantization: str) -> dict:
    """CTranslate2's conversion of ``model_dir``: {"seconds"}, or {"error"} with its one-line reason."""
    record = out.parent / f"{out.name}.json"
    if record.is_file():
        return json.loads(record.read_text())
    try:
        import ctranslate2
    except ImportError:
        return {"error": "ctranslate2 is not installed (pip install ctranslate2)"}
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            ctranslate2.converters.TransformersConverter(str(model_dir)).convert(tmp + "/m", quantization=quantization)
            os.replace(tmp + "/m", out)
        result = {"seconds": round(time.perf_counter() - start, 1)}
    except Exception as e:  # noqa: BLE001 - any converter failure is a row left out, with its reason
        result = {"error": f"not convertible by CTranslate2 {ctranslate2.__version__}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}"[:300]}
    write_json_atomic(record, result)
    return result


def ct2_system(name: str, folder: Path, params: int, threads: int, length: int) -> System:
    """A CTranslate2 model translating token ids: ids ↔ tokens by its own vocabulary files."""
    import ctranslate2

    def vocabulary(kind: str) -> list[str]:
        for stem in (f"{kind}_vocabulary", "shared_vocabulary"):
            if (folder / f"{stem}.json").is_file():
                return json.loads((folder / f"{stem}.json").read_text())
            if (folder / f"{stem}.txt").is_file():
                return (folder / f"{stem}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        raise FileNotFoundError(f"no {kind} vocabulary in {folder}")

    source = vocabulary("source")
    target = {token: i for i, token in enumerate(vocabulary("target"))}
    translator = ctranslate2.Translator(str(folder), device="cpu", inter_threads=1, intra_threads=threads)

    def generate(batch):
        results = translator.translate_batch([[source[i] for i in s] for s in batch], beam_size=1,
                                             max_decoding_length=length, min_decoding_length=length)
        return [[target[t] for t in r.hypotheses[0]] for r in results]

    return System(name, params, round((folder / "model.bin").stat().st_size / 2**20, 3), generate, None)


LANGUAGE_PAIR = ("eng_Latn", "deu_Latn")  # the two language codes a trimmed NLLB-shaped model keeps


def shape_trim(model, tokenizer, kept: int, seed: int = 0):
    """A ``vocabulary.Trim`` keeping ``kept`` rows of ``model``'s one vocabulary: the ids the tokenizer,
    the config and the generation config name (``vocabulary.named_ids``), the language codes of
    ``LANGUAGE_PAIR`` where the tokenizer has them, and ids drawn at random (``seed``) from the rest up
    to ``kept`` (the weights are random, so which ids matter no more than how many)."""
    from mdcompress import vocabulary

    size = model.get_input_embeddings().num_embeddings
    codes = {key: code for key, code in zip(("source_lang_code", "target_lang_code"), LANGUAGE_PAIR)
             if vocabulary.language_code_id(tokenizer, code) is not None}
    named = vocabulary.named_ids(model, tokenizer, codes)
    special = sorted(set(named.values()))
    others = np.setdiff1d(np.arange(size), special)
    drawn = np.random.default_rng(seed).choice(others, kept - len(special), replace=False)
    ids = sorted([*special, *drawn.tolist()])
    return vocabulary.Trim(source=ids, target=ids, before=(size, size), named=named, shared=True)


def trimmed_models(dense_dir: Path, work: Path, kept: int) -> tuple[Path, Path, dict]:
    """The dense model of ``dense_dir`` trimmed to ``kept`` tokens (``shape_trim``, ``trim_model_``)
    and its ~50% student (``student_ranks`` of the trimmed model: every linear of the layers and the
    trimmed embedding at half its size), saved under ``work`` (kept from an earlier run there), and
    what they cost: the trimming and the factorization."""
    from transformers import AutoTokenizer

    from mdcompress import vocabulary

    dense_trim, student_trim, costs_file = work / "dense", work / "student", work / "costs.json"
    if weights_file(student_trim) is not None and costs_file.is_file():
        return dense_trim, student_trim, json.loads(costs_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    model = load_compressed_model(dense_dir)
    start = time.perf_counter()
    trim = shape_trim(model, tokenizer, kept)
    vocabulary.trim_model_(model, trim)
    costs = {"trimming_s": round(time.perf_counter() - start, 2), "vocabulary_before": trim.before[0],
             "vocabulary_after": len(trim.source), "named": trim.named}
    save_compressed_model(model, dense_trim, tokenizer)
    ranks = student_ranks(model)
    methods = [svd_method(*model.get_submodule(k.removesuffix(".weight")).weight.shape, r) for k, r in ranks.items()]
    start = time.perf_counter()
    decompose_(model, list(ranks), k_info=ranks, svd="auto")
    costs["factorization"] = {"svd": "auto", "seconds": round(time.perf_counter() - start, 2), "layers": len(ranks),
                              "exact": methods.count("exact"), "lowrank": methods.count("lowrank"), "ranks": ranks}
    save_compressed_model(model, student_trim, tokenizer)
    write_json_atomic(work / "kept_ids.json", trim.source)
    write_json_atomic(costs_file, costs)  # last: its presence says the folder is complete
    return dense_trim, student_trim, costs


def renumbered(system: System, kept_ids: list[int], unknown: int) -> System:
    """``system`` (a model with a trimmed vocabulary) fed the untrimmed model's ids: each source id
    renumbered to the trimmed one, an id outside the kept set to ``unknown``, as its tokenizer would
    read the word (the sources are the same length, so every system does the same work)."""
    mapping = {old: new for new, old in enumerate(kept_ids)}
    inner = system.generate
    system.generate = lambda batch: inner([[mapping.get(i, unknown) for i in s] for s in batch])
    return system


def trim_label(role: str, kept: int) -> str:
    return f"ONNX Runtime {role} int8, vocabulary trimmed to {kept:,}"


def shape_rows(name: str, shape: Shape, args, work: Path) -> dict:
    """One shape: the models, what the student cost, every runtime's row at each thread count."""
    samples, measured = (8, 4) if args.quick else (args.calibration_samples, args.sensitivity_pairs)
    torch.set_num_threads(args.threads[0])  # the costs are measured at the first thread count (kept in ``work``)
    dense_dir, student_dir, costs = shape_models(name, shape, work, samples, measured)
    dense = load_compressed_model(dense_dir)
    dense_params, source_vocab = count_parameters(dense), dense.get_encoder().embed_tokens.num_embeddings
    del dense
    student_params = count_parameters(load_compressed_model(student_dir))
    float32 = dense_params * 4 <= args.float32_limit_gb * 2**30
    precisions = ("float32", "int8") if float32 else ("int8",)
    exports = {f"{role} {p}": timed_export(folder, work / f"onnx-{role}-{p}", p)
               for role, folder in (("dense", dense_dir), ("student", student_dir)) for p in precisions}
    conversions = {p: ct2_convert(dense_dir, work / f"ct2-{p}", p) for p in precisions}
    costs = {**costs, "export": exports, "ct2_conversion": conversions}
    trims = {}  # {kept: (folders, its record)}: the rows of --trim-kept
    for kept in args.trim_kept:
        trim_work = work / f"trim-{kept}"
        dense_trim, student_trim, trim_costs = trimmed_models(dense_dir, trim_work, kept)
        folders = {"dense": dense_trim, "student": student_trim}
        trim_costs["export"] = {f"{role} int8": timed_export(folder, trim_work / f"onnx-{role}-int8", "int8")
                                for role, folder in folders.items()}
        trims[kept] = (folders, {
            "kept": kept, "dense_params": count_parameters(load_compressed_model(dense_trim)),
            "student_params": count_parameters(load_compressed_model(student_trim)),
            "kept_ids": json.loads((trim_work / "kept_ids.json").read_text()), "costs": trim_costs})
        gc.collect()
    n32, n1, length = (16, 2, 8) if args.quick else SHAPE_SETTINGS[name]
    generator = np.random.default_rng(0)
    eos = json.loads((dense_dir / "config.json").read_text())["eos_token_id"]
    sources = [[*generator.integers(4, source_vocab - 2, 15).tolist(), eos] for _ in range(n32)]
    result = {"shape": name, **asdict(shape), "dense_params": dense_params, "student_params": student_params,
              "student_share": round(student_params / dense_params, 3), "sentences_b32": n32, "sentences_b1": n1,
              "generated_tokens": length, "float32_rows": float32 or f"left out: the dense model's float32 weights "
                                                                     f"exceed {args.float32_limit_gb} GB (memory)",
              "costs": costs, "systems": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        systems, missing = [], []
        for role, folder, params in (("dense", dense_dir, dense_params), ("student", student_dir, student_params)):
            systems.append(ours(f"PyTorch {role}", TorchTranslator.load(folder, threads), params,
                                round(weights_file(folder).stat().st_size / 2**20, 3), length, length))
            for p in precisions:
                label = f"ONNX Runtime {role} {p}"
                if "error" in exports[f"{role} {p}"]:
                    missing.append((label, params, exports[f"{role} {p}"]["error"]))
                else:
                    out = work / f"onnx-{role}-{p}"
                    systems.append(ours(label, OnnxTranslator(out, threads), params, folder_mb(out), length, length))
        for p in precisions:
            label = f"CTranslate2 dense {p}"
            if "error" in conversions[p]:
                missing.append((label, dense_params, conversions[p]["error"]))
            else:
                systems.append(ct2_system(label, work / f"ct2-{p}", dense_params, threads, length))
        for kept, (folders, record) in trims.items():
            for role, folder in folders.items():
                label, params = trim_label(role, kept), record[f"{role}_params"]
                if "error" in record["costs"]["export"][f"{role} int8"]:
                    missing.append((label, params, record["costs"]["export"][f"{role} int8"]["error"]))
                    continue
                out = folder.parent / f"onnx-{role}-int8"
                translator = OnnxTranslator(out, threads)
                systems.append(renumbered(ours(label, translator, params, folder_mb(out), length, length),
                                          record["kept_ids"], translator.tokenizer.unk_token_id))
        speed = timed_rounds(systems, {32: sources, 1: sources[:n1]}, args.rounds)
        ct2 = speed.get("CTranslate2 dense int8")
        ct2_mb = next((s.size_mb for s in systems if s.name == "CTranslate2 dense int8"), None)
        for s in systems:
            lengths = {len(o) for o in speed[s.name][32][1]}
            assert lengths == {length}, (s.name, lengths)  # the same work for every system
            result["systems"].append({
                "system": s.name, "threads": threads, "params": s.params, "size_mb": s.size_mb,
                "sent_per_s_b1": round(speed[s.name][1][0], 3), "sent_per_s_b32": round(speed[s.name][32][0], 3),
                "vs_ct2_int8_b1": round(speed[s.name][1][0] / ct2[1][0], 2) if ct2 else None,
                "vs_ct2_int8_b32": round(speed[s.name][32][0] / ct2[32][0], 2) if ct2 else None,
                "size_vs_ct2_int8": round(s.size_mb / ct2_mb, 3) if ct2_mb else None})
        for label, params, reason in missing:
            result["systems"].append({"system": label, "threads": threads, "params": params, "missing": reason})
        del systems, speed
        gc.collect()
    profiles = {}
    for role in ("dense", "student"):
        folder = work / f"onnx-{role}-int8"
        if "error" not in exports[f"{role} int8"]:
            profiles[f"{role} int8"] = step_profile(folder, 32, 16, 16, 1)
    for kept, (folders, record) in trims.items():
        out = folders["student"].parent / "onnx-student-int8"
        if "error" not in record["costs"]["export"]["student int8"]:
            profiles[f"student int8, vocabulary trimmed to {kept:,}"] = step_profile(out, 32, 16, 16, 1)
    result["step_profile"] = profiles
    if trims:
        result["trim"] = [{key: value for key, value in record.items() if key != "kept_ids"}
                          | {"student_share_of_dense": round(record["student_params"] / dense_params, 3)}
                          for _, record in trims.values()]
    return result


def shapes(args, work: Path, write) -> dict:
    results = {"section": "shapes", "rounds": args.rounds, "threads": args.threads, "quick": args.quick,
               "versions": versions(), "load_average_start": os.getloadavg(), "shapes": []}
    for name in args.shape:
        shape = SHAPES[name].tiny() if args.quick else SHAPES[name]
        start = time.perf_counter()
        results["shapes"].append(shape_rows(name, shape, args, work / name))
        results["shapes"][-1]["wall_s"] = round(time.perf_counter() - start, 1)
        results["shapes"][-1]["load_average_end"] = os.getloadavg()
        write(results)  # what is measured so far, should a later shape not finish
        gc.collect()
    return results


def versions() -> dict:
    import onnxruntime
    import transformers

    try:
        import ctranslate2
        ct2 = ctranslate2.__version__
    except ImportError:
        ct2 = None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "ctranslate2": ct2}


SHAPE_COLUMNS = [("system", "system", "s"), ("threads", "threads", "d"), ("params", "params", ","),
                 ("size_mb", "MB on disk", ".1f"), ("sent_per_s_b1", "sent/s batch 1", ".2f"),
                 ("sent_per_s_b32", "sent/s batch 32", ".2f"), ("vs_ct2_int8_b1", "× CT2 int8 (b1)", ".2f"),
                 ("vs_ct2_int8_b32", "× CT2 int8 (b32)", ".2f"), ("size_vs_ct2_int8", "size ÷ CT2 int8", ".2f"),
                 ("missing", "left out", "s")]


def shape_report(shape: dict) -> str:
    """The printed summary of one shape: its rows, then what the student cost."""
    costs = shape["costs"]
    lines = [f"## {shape['shape']}: {shape['dense_params']:,} → {shape['student_params']:,} parameters "
             f"({100 * shape['student_share']:.1f}%)", table(shape["systems"], SHAPE_COLUMNS)]
    factorization, sensitivity = costs["factorization"], costs["sensitivity"]
    lines.append(f"factorization ({factorization['layers']} layers, svd auto: {factorization['exact']} exact, "
                 f"{factorization['lowrank']} lowrank): {factorization['seconds']:.1f} s")
    for what, record in costs["export"].items():
        lines.append(f"export {what}: " + (record["error"] if "error" in record else f"{record['seconds']:.0f} s"))
    lines.append(f"rank sensitivity on {sensitivity['calibration_samples']} pairs, {sensitivity['layers']} layers: "
                 f"{sensitivity['extrapolated_s'] / 60:.1f} min extrapolated ({sensitivity['method']})")
    for trim in shape.get("trim", []):
        costs = trim["costs"]
        lines.append(f"vocabulary trimmed to {trim['kept']:,} of {costs['vocabulary_before']:,}: "
                     f"{trim['dense_params']:,} parameters, student {trim['student_params']:,} "
                     f"({100 * trim['student_share_of_dense']:.1f}% of the dense model); trimming "
                     f"{costs['trimming_s']:.1f} s, factorization {costs['factorization']['seconds']:.1f} s, "
                     + ", ".join(f"export {what} " + (r["error"] if "error" in r else f"{r['seconds']:.0f} s")
                                 for what, r in costs["export"].items()))
    for name, profile in shape.get("step_profile", {}).items():
        top = ", ".join(f"{op} {100 * share:.0f}%" for op, share in list(profile["share"].items())[:6])
        lines.append(f"decoder step, {name}: {profile['ms_per_step']:.1f} ms ({top})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", nargs="?", choices=["shipped", "opus", "shapes"], default="shipped")
    parser.add_argument("--teacher", default=str(REPO / "models" / "teacher-en-de"))
    parser.add_argument("--student", help="a folder written by compress_model.py from the teacher (shipped)")
    parser.add_argument("--pairs", default=str(SHARED_DEV if SHARED_DEV.is_file() else
                                               REPO / "data" / "tatoeba_en_de" / "eval.csv"),
                        help="CSV of source_text,target_text (default: the 1,000 dev pairs after the shipped eval.csv)")
    parser.add_argument("--skip", type=int, default=1000 if SHARED_DEV.is_file() else 0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch1", type=int, default=200, help="sentences translated one at a time")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="threads of every runtime (shipped: one value; shapes: each value in turn)")
    parser.add_argument("--opus-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="shapes: the architectures to run, in this order")
    parser.add_argument("--calibration-samples", type=int, default=256,
                        help="shapes: the calibration pairs the rank-sensitivity cost is extrapolated to (the tool's "
                             "calibration_samples)")
    parser.add_argument("--sensitivity-pairs", type=int, default=32,
                        help="shapes: the calibration pairs the rank-sensitivity measurement is timed on")
    parser.add_argument("--float32-limit-gb", type=float, default=2.0,
                        help="shapes: ONNX Runtime and CTranslate2 float32 rows only for models whose float32 weights "
                             "stay below this (the memory every system of a shape holds at once)")
    parser.add_argument("--trim-kept", type=int, nargs="+", default=[],
                        help="shapes: also the model with its vocabulary trimmed to each of these sizes (the special "
                             "tokens, two language codes and ids drawn at random), int8 in ONNX Runtime, dense and "
                             "with a ~50%% student factorized from it; for shapes with one vocabulary")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the exports and models (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, few sentences, one round")
    args = parser.parse_args(argv)
    quiet_transformers()
    if args.quick:
        args.rounds, args.limit, args.batch1, args.opus_threads = 1, 24, 8, [1]
    for kept in args.trim_kept:
        if args.section != "shapes":
            parser.error(f"--trim-kept {kept}: trimming rows are for the shapes section, not {args.section}")
        for name in args.shape:
            shape = SHAPES[name].tiny() if args.quick else SHAPES[name]
            if shape.target_vocab is not None or not 16 <= kept < shape.vocab:
                parser.error(f"--trim-kept {kept}: shape {name} " + (
                    "has separate source and target vocabularies; trim a shape with one (opus, nllb)"
                    if shape.target_vocab is not None else f"has {shape.vocab:,} tokens; keep from 16 to "
                                                           f"{shape.vocab - 1:,} of them"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)

    def write(results: dict) -> None:
        if args.json:
            write_json_atomic(args.json, results)

    if args.section == "shipped":
        if not args.student:
            parser.error("shipped needs --student (a folder written by compress_model.py from --teacher)")
        if len(args.threads) != 1:
            parser.error(f"--threads: shipped runs at one thread count, got {args.threads}")
        args.threads = args.threads[0]
        results = shipped(args, work)
        columns = [("system", "system", "s"), ("params", "params", ","), ("size_mb", "MB on disk", ".2f"),
                   ("bleu", "BLEU", ".2f"), ("chrf", "chrF", ".2f"), ("same", "same as PyTorch", "d"),
                   ("sent_per_s_b1", "sent/s batch 1", ".1f"), ("sent_per_s_b32", "sent/s batch 32", ".1f"),
                   ("speedup_b32", "× PyTorch teacher (b32)", ".2f")]
        print(table(results["systems"], columns))
    elif args.section == "opus":
        results = opus(args, work)
        columns = [("system", "system", "s"), ("threads", "threads", "d"), ("params", "params", ","),
                   ("size_mb", "MB on disk", ".1f"), ("sent_per_s_b1", "sent/s batch 1", ".2f"),
                   ("sent_per_s_b32", "sent/s batch 32", ".2f"), ("vs_onnx_dense_b32", "× ONNX dense (b32)", ".2f"),
                   ("vs_ct2_int8_b32", "× CT2 int8 dense (b32)", ".2f")]
        print(table(results["systems"], columns))
    else:
        results = shapes(args, work, write)
        for shape in results["shapes"]:
            print(shape_report(shape))
    for name, profile in results.get("step_profile", {}).items():
        top = ", ".join(f"{op} {100 * share:.0f}%" for op, share in list(profile["share"].items())[:6])
        print(f"decoder step, {name.replace('teacher', 'dense')}: {profile['ms_per_step']:.1f} ms ({top})")
    write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
