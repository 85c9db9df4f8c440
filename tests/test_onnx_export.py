"""ONNX Runtime export and the translate command: the exported graphs compute what the PyTorch model
computes (greedy and beam translations equal), factorized layers stay factorized, the embedding is
stored once, int8 stays close to float32 on real sentences, and bad input is refused in one line."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import sacrebleu
import torch

from helpers import REPO, run_command, varied_
from mdcompress.data import read_pairs
from matrix_decomposition import count_parameters, decompose_, save_compressed_model
from mdcompress.onnx_export import ExportError, export
from mdcompress.translate import TranslateError, load_translator, translate_lines

EVAL_CSV = REPO / "data" / "tatoeba_en_de" / "eval.csv"
SHIPPED = REPO / "models" / "teacher-en-de"


def stored_floats(folder) -> int:
    """Float32 numbers the export stores (external data and inline initializers, each tensor once)."""
    inline = sum(np.prod(t.dims) for name in ("encoder.onnx", "decoder.onnx")
                 for t in onnx.load(str(folder / name), load_external_data=False).graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and t.HasField("raw_data"))
    return int(inline) + (folder / "weights.bin").stat().st_size // 4


@pytest.fixture
def varied_teacher_dir(tmp_path, make_tiny_marian, tiny_tokenizer):
    """A tiny dense Marian whose translations depend on its input, saved by this tool."""
    save_compressed_model(varied_(make_tiny_marian(), 0.3), tmp_path / "teacher", tiny_tokenizer)
    return tmp_path / "teacher"


@pytest.fixture
def factorized_dir(tmp_path, make_tiny_marian, tiny_tokenizer):
    """A tiny Marian with every linear and the shared embedding factorized, saved by this tool."""
    model = make_tiny_marian()
    decompose_(model, ["*"], k_info=4)
    save_compressed_model(varied_(model, 0.5), tmp_path / "student", tiny_tokenizer)
    return tmp_path / "student"


@pytest.mark.parametrize("which", ["dense", "factorized"])
def test_onnx_translations_equal_pytorch_greedy_and_beam(which, varied_teacher_dir, factorized_dir, tiny_pairs, tmp_path):
    folder = varied_teacher_dir if which == "dense" else factorized_dir
    onnx_dir = export(folder, tmp_path / "onnx")
    sources = [s for s, _ in tiny_pairs[:60]]
    torch_translator, onnx_translator = load_translator(folder), load_translator(onnx_dir)
    assert onnx_translator.backend == "onnx" and torch_translator.backend == "torch"
    for beams in (1, 3):
        expected = translate_lines(torch_translator, sources, batch_size=16, num_beams=beams, max_new_tokens=12)
        got = translate_lines(onnx_translator, sources, batch_size=16, num_beams=beams, max_new_tokens=12)
        assert len(set(expected)) > 10  # the model says different things for different inputs
        assert got == expected, beams
    info = json.loads((onnx_dir / "onnx_export.json").read_text())
    assert info["precision"] == "float32" and info["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("which", ["dense", "factorized"])
def test_separate_vocabularies_export_and_translate_as_pytorch(which, make_tiny_marian, tiny_tokenizer, tmp_path):
    """The OPUS-MT "tc-big" layout: source and target vocabularies of their own (here the target's is the
    larger, which overflowed the encoder's embedding when the export checked itself) and an untied output
    projection. Both precisions export; float32 greedy and beam search give PyTorch's tokens."""
    model = make_tiny_marian(share_encoder_decoder_embeddings=False, decoder_vocab_size=len(tiny_tokenizer) + 37,
                             tie_word_embeddings=False)
    assert model.get_encoder().embed_tokens.num_embeddings < model.lm_head.out_features
    if which == "factorized":
        decompose_(model, ["*"], k_info=4)
    varied_(model, 0.5)
    save_compressed_model(model, tmp_path / "model", tiny_tokenizer)
    onnx_dir = export(tmp_path / "model", tmp_path / "onnx")
    assert export(tmp_path / "model", tmp_path / "onnx-int8", "int8").is_dir()
    torch_translator, onnx_translator = load_translator(tmp_path / "model"), load_translator(onnx_dir)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, len(tiny_tokenizer), (12, 9), generator=generator)
    ids[:, -1] = tiny_tokenizer.eos_token_id
    mask = torch.ones_like(ids)
    for beams in (1, 3):
        expected = torch_translator.generate(ids.numpy(), mask.numpy(), num_beams=beams, max_new_tokens=10)
        got = onnx_translator.generate(ids.numpy(), mask.numpy(), num_beams=beams, max_new_tokens=10)
        assert [list(map(int, g)) for g in got] == [list(map(int, e)) for e in expected], beams
        assert any(t >= len(tiny_tokenizer) for e in expected for t in e)  # target-only ids are produced


def test_factorized_export_stores_the_factors_and_the_embedding_once(make_tiny_marian, tmp_path):
    teacher = varied_(make_tiny_marian(), 0.3, positions=False)
    student = make_tiny_marian()
    decompose_(student, ["*"], k_info=4)
    varied_(student, 0.3, positions=False)
    positions = student.model.decoder.embed_positions.weight.numel()  # the sinusoid table (one copy, shared)
    stored = stored_floats(export("student", tmp_path / "student-onnx", model=student))
    # every parameter once (the tied output projection reuses the embedding's factor A; the encoder's
    # and decoder's identical position tables are one), nothing the size of a re-multiplied matrix
    # (which would add V·d or d·d floats); the one extra allowed is the embedding's small factor B (r×d),
    # inline in both graphs and transposed for the output projection
    shapes = [tuple(t.dims) for name in ("encoder.onnx", "decoder.onnx")
              for t in onnx.load(str(tmp_path / "student-onnx" / name), load_external_data=False).graph.initializer]
    assert not [s for s in shapes if len(s) == 2 and min(s) > 4 and s != (64, 16)]  # rank 4; (64, 16): positions
    small_factor = student.model.shared.down.weight.numel()
    assert 0 <= stored - (count_parameters(student) - positions) <= 2 * small_factor + 16
    stored_teacher = stored_floats(export("teacher", tmp_path / "teacher-onnx", model=teacher))
    assert 0 <= stored_teacher - (count_parameters(teacher) - positions) <= 16
    assert stored < 0.8 * stored_teacher


@pytest.mark.slow
def test_exports_of_the_shipped_teacher_translate_as_pytorch_and_int8_is_smaller_and_keeps_bleu(tmp_path):
    pairs = read_pairs(EVAL_CSV)[:400]
    sources, refs = [s for s, _ in pairs], [[t for _, t in pairs]]
    fp32, int8 = export(SHIPPED, tmp_path / "fp32"), export(SHIPPED, tmp_path / "int8", "int8")
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.onnx")) + (folder / "weights.bin").stat().st_size  # noqa: E731
    assert size(int8) < 0.4 * size(fp32)
    ops = {n.op_type for n in onnx.load(str(int8 / "decoder.onnx"), load_external_data=False).graph.node}
    assert "MatMulInteger" in ops
    translations = {name: translate_lines(load_translator(folder), sources, max_new_tokens=64)
                    for name, folder in (("torch", SHIPPED), ("fp32", fp32), ("int8", int8))}
    assert translations["fp32"] == translations["torch"]  # the exported greedy search, on real sentences
    bleu = {name: sacrebleu.corpus_bleu(translations[name], refs).score for name in ("fp32", "int8")}
    assert bleu["fp32"] > 20  # a real translator
    assert abs(bleu["int8"] - bleu["fp32"]) <= 0.5 * 2  # 0.5 on the 1,000 pairs of the benchmark; 400 here are noisier


class _Stdin:
    """Standard input holding ``data``, a terminal or not."""

    def __init__(self, data: bytes, tty: bool = False):
        import io

        self.buffer, self.tty = io.BytesIO(data), tty

    def isatty(self) -> bool:
        return self.tty


def translate_command(args, monkeypatch, capsys, stdin: bytes = b"", cwd=None):
    """``translate.py args`` run in this process (``stdin`` piped in, from ``cwd``): its exit status,
    standard output and standard error."""
    from mdcompress import translate

    monkeypatch.setattr(sys, "stdin", _Stdin(stdin))
    if cwd is not None:
        monkeypatch.chdir(cwd)
    code = translate.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_translate_command_from_another_folder(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    onnx_dir = export(tiny_teacher_dir, tmp_path / "onnx-model")
    lines = ["How are you?", "", "I like tea.", "Tom is here."]
    outputs = {}
    for name, model in (("torch", tiny_teacher_dir), ("onnx", onnx_dir)):
        code, out, err = translate_command(["--model", model, "--max-new-tokens", "8"], monkeypatch, capsys,
                                           stdin=("\n".join(lines) + "\n").encode(), cwd=tmp_path)
        assert code == 0, err
        outputs[name] = out.split("\n")[:-1]
        assert len(outputs[name]) == len(lines) and outputs[name][1] == "" and outputs[name][0]
    assert outputs["torch"] == outputs["onnx"]


def test_export_command_writes_next_to_the_model_and_refuses_to_overwrite(tiny_teacher_dir, capsys):
    from mdcompress import onnx_export

    command = ["--model", str(tiny_teacher_dir), "--int8"]
    assert onnx_export.main(command) == 0, capsys.readouterr().err
    assert (tiny_teacher_dir / "onnx-int8" / "onnx_export.json").is_file()
    capsys.readouterr()
    assert onnx_export.main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onnx_export.py: error: ") and "--overwrite" in err


def test_export_refuses_other_architectures_in_one_line(tmp_path):
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    pegasus = PegasusForConditionalGeneration(PegasusConfig(vocab_size=50, d_model=16, encoder_layers=1,
                                                            decoder_layers=1, encoder_attention_heads=2,
                                                            decoder_attention_heads=2, encoder_ffn_dim=32,
                                                            decoder_ffn_dim=32))
    with pytest.raises(ExportError, match=r"PegasusForConditionalGeneration \(model_type 'pegasus'\) cannot be "
                                          r"exported: supported are the model types bart, m2m_100, marian, mbart"):
        export("pegasus", tmp_path / "out", model=pegasus)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, shell", [("Helsinki-NLP/opus-mt-en-de", True), ("models/teacher-en-dx", False)])
def test_export_command_without_out_needs_a_model_folder(model, shell, tmp_path, monkeypatch, capsys):
    """With no --out the export goes into the model folder: a hub id, or a mistyped folder (taken for one), is
    refused in one line naming it and where it was looked for, before anything is loaded or written. The
    first case runs as the command itself, from the shell: exit 2, that line and no traceback."""
    from mdcompress import onnx_export

    if shell:
        done = run_command([sys.executable, "-m", "mdcompress.onnx_export", "--model", model], cwd=tmp_path,
                           timeout=120, check=False)
        code, err = done.returncode, done.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code, err = onnx_export.main(["--model", model]), capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    prog = "python -m mdcompress.onnx_export" if shell else "onnx_export.py"  # as typed; from Python, the file
    assert err == (f"{prog}: error: --out is needed when --model is a hub id: {model!r} is no local "
                   f"folder (looked for {str(tmp_path.resolve() / model)!r}); give --out, or the path of a "
                   f"model folder\n")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["not_a_model", "onnx_as_model", "folder_exists", "precision"])
def test_export_errors(case, tiny_teacher_dir, tmp_path):
    out = tmp_path / "out"
    kwargs = {}
    if case == "not_a_model":
        (tmp_path / "empty").mkdir()
        model, expected = tmp_path / "empty", "no config.json"
    elif case == "onnx_as_model":
        model, expected = export(tiny_teacher_dir, tmp_path / "exported"), "already an ONNX export"
    elif case == "folder_exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        model, expected = tiny_teacher_dir, "never replaced"
        kwargs = {"overwrite": True}
    else:
        model, expected, kwargs = tiny_teacher_dir, "not one of float32, int8", {"precision": "fp8"}
    with pytest.raises(ExportError, match=expected):
        export(model, out, **kwargs)
    assert case == "folder_exists" and (out / "mine.txt").read_text() == "keep me" or not out.exists()


@pytest.mark.parametrize("case", ["backend", "no_export", "torch_on_onnx", "threads"])
def test_translator_errors(case, tiny_teacher_dir, tmp_path):
    args = {"backend": (tiny_teacher_dir, "gpu", 1), "no_export": (tiny_teacher_dir, "onnx", 1),
            "torch_on_onnx": (export(tiny_teacher_dir, tmp_path / "o") if case == "torch_on_onnx" else None, "torch", 1),
            "threads": (tiny_teacher_dir, "auto", 0)}[case]
    expected = {"backend": "not one of auto, torch, onnx", "no_export": "python -m mdcompress.onnx_export --model",
                "torch_on_onnx": "is an ONNX export", "threads": "at least 1"}[case]
    with pytest.raises(TranslateError, match=expected):
        load_translator(*args)


@pytest.mark.slow
def test_translate_command_errors_are_one_line(tmp_path):
    """As the command itself, from the shell: exit 2, one line and no traceback."""
    done = run_command([sys.executable, "-m", "mdcompress.translate", "--model", str(tmp_path / "nowhere")],
                       input="hi\n", timeout=120, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("python -m mdcompress.translate: error: ") and "nowhere" in done.stderr


@pytest.mark.parametrize("case", ["output_is_a_folder", "output_folder_missing", "stdin_not_utf8", "input_not_utf8"])
def test_translate_command_input_and_output_errors(case, tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """Refused in one line, exit 2, nothing written: an --output that cannot be written is refused before
    the model is loaded; input that is not UTF-8 (on standard input whatever the locale) names its source."""
    (tmp_path / "latin1.txt").write_bytes("Grüße\n".encode("latin-1"))
    stdin = "Hello.\n".encode()
    args, expected = {
        "output_is_a_folder": (["--output", str(tmp_path)], "is a folder"),
        "output_folder_missing": (["--output", str(tmp_path / "no" / "out.txt")], "does not exist"),
        "stdin_not_utf8": ([], "standard input is not UTF-8 text (byte 0xfc on line 1)"),
        "input_not_utf8": (["--input", str(tmp_path / "latin1.txt")], "latin1.txt' is not UTF-8 text"),
    }[case]
    if case == "stdin_not_utf8":
        stdin = "Grüße\n".encode("latin-1")
    before = sorted(tmp_path.rglob("*"))
    code, _, err = translate_command(["--model", tiny_teacher_dir, *args], monkeypatch, capsys, stdin=stdin,
                                     cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and err.startswith("translate.py: error: "), err
    assert expected in err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_translate_command_refuses_to_write_over_its_input(how, tmp_path, monkeypatch, capsys):
    """--output naming the --input file (as written, by another relative path, through a link) is refused
    in one line before the model is loaded (the model here does not even exist), and the input is kept."""
    (tmp_path / "sub").mkdir()
    source = tmp_path / "in.txt"
    source.write_text("Hello.\n")
    output = {"same": "in.txt", "relative": "sub/../in.txt", "symlink": "link.txt", "hardlink": "hard.txt"}[how]
    if how == "symlink":
        (tmp_path / "link.txt").symlink_to(source)
    elif how == "hardlink":
        os.link(source, tmp_path / "hard.txt")
    code, out, err = translate_command(["--model", tmp_path / "no-model", "--input", "in.txt", "--output", output],
                                       monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and out == "", err
    assert f"--output: {output!r} is the input file" in err and "name another file" in err
    assert source.read_text() == "Hello.\n"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_line_longer_than_the_model_reads_is_cut_with_one_warning(backend, tiny_teacher_dir, tmp_path):
    """The tiny model has 64 positions: a longer source is cut to 64 tokens (ending with </s>) instead of
    crashing the batch, every line is translated, and one warning says how many lines were cut, and where."""
    model = tiny_teacher_dir if backend == "torch" else export(tiny_teacher_dir, tmp_path / "onnx")
    translator = load_translator(model)
    assert translator.max_positions == 64
    long = " ".join(["I like tea and the dog is happy."] * 20)
    assert len(translator.tokenizer(long)["input_ids"]) > 64
    warnings = []
    out = translate_lines(translator, ["Hello.", long, "", long], max_new_tokens=4, warn=warnings.append)
    assert len(out) == 4 and out[0] and out[1] and out[2] == "" and out[3]
    assert warnings == ["2 lines (lines 2, 4) had more tokens than the model reads and were cut to the first 64; "
                        "the rest is not translated"]
    cut = translator.tokenizer(long, truncation=True, max_length=64)["input_ids"]
    assert len(cut) == 64 and cut[-1] == translator.tokenizer.eos_token_id
    assert out[1] == translate_ids_of(translator, cut)
    quiet = []
    assert translate_lines(translator, ["Hello."], max_new_tokens=4, warn=quiet.append) == out[:1] and not quiet


def translate_ids_of(translator, ids) -> str:
    from mdcompress.translate import translate_ids

    return translate_ids(translator, [ids], max_new_tokens=4)[0]


def test_translate_command_cuts_a_long_line_and_keeps_every_line(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    lines = ["Hello.", " ".join(["I like tea and the dog is happy."] * 20), "Tom is here."]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    code, _, err = translate_command(["--model", tiny_teacher_dir, "--max-new-tokens", "4", "--input", "in.txt",
                                      "--output", "out.txt"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 0, err
    assert err == ("translate.py: warning: 1 line (line 2) had more tokens than the model reads and was cut "
                   "to the first 64; the rest is not translated\n")
    assert len((tmp_path / "out.txt").read_text().split("\n")[:-1]) == 3


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_generation_asks_no_more_tokens_than_the_decoder_has_positions(backend, tiny_teacher_dir, tmp_path):
    model = tiny_teacher_dir if backend == "torch" else export(tiny_teacher_dir, tmp_path / "onnx")
    translator = load_translator(model)
    ids = np.array([translator.tokenizer("Hello.")["input_ids"]], dtype=np.int64)
    out = translator.generate(ids, np.ones_like(ids), max_new_tokens=500, min_new_tokens=500)  # no early </s>
    assert len(out[0]) == 64


@pytest.mark.parametrize("tty", [True, False])
def test_translate_command_says_it_reads_a_terminal(tty, tiny_teacher_dir, monkeypatch, capsys):
    """Typed sentences are read until Ctrl-D: with no --input and a terminal on standard input, one line on
    stderr says so (else the command seems to hang); piped input gets no such line."""
    from mdcompress import translate

    monkeypatch.setattr(sys, "stdin", _Stdin(b"Hello.\nTom is here.\n", tty))
    assert translate.main(["--model", str(tiny_teacher_dir), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split("\n")[:-1]) == 2
    hint = ("translate.py: reading sentences from standard input, one per line; end with Ctrl-D (Ctrl-Z Enter on "
            "Windows), or give --input FILE\n")
    assert captured.err == (hint if tty else "")


@pytest.mark.parametrize("case", ["torch", "onnx", "stdout", "writing_the_output"])
def test_translate_command_interrupted_says_so_in_one_line(case, tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C (while translating, on either backend, or while the output is written): exit 130 after one
    line, no traceback, no --output file and no temporary file beside it."""
    from mdcompress import translate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    model = export(tiny_teacher_dir, tmp_path / "onnx") if case == "onnx" else tiny_teacher_dir
    (tmp_path / "in.txt").write_text("Hello.\nTom is here.\n")
    if case == "writing_the_output":
        monkeypatch.setattr(translate.os, "replace", interrupt)
    else:
        monkeypatch.setattr(translate.OnnxTranslator if case == "onnx" else translate.TorchTranslator, "generate",
                            interrupt)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    output = ["--output", "out.txt"] if case != "stdout" else []
    assert translate.main(["--model", str(model), "--input", "in.txt", *output]) == 130
    captured = capsys.readouterr()
    where = "standard output" if case == "stdout" else "'out.txt'"
    assert captured.err == f"translate.py: interrupted; nothing written to {where}\n" and captured.out == ""
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("stage", ["_export_graphs", "_quantize", "save_pretrained"])
def test_export_command_interrupted_says_so_in_one_line(stage, tiny_teacher_dir, monkeypatch, capsys):
    """Ctrl-C during an export: exit 130 after one line, no traceback, and the model folder as it was
    (no onnx-int8 folder, no temporary folder)."""
    from mdcompress import onnx_export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "save_pretrained":  # the last step before the folder is moved into place
        from transformers import PreTrainedTokenizerBase

        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupt)
    else:
        monkeypatch.setattr(onnx_export, stage, interrupt)
    before = sorted(tiny_teacher_dir.rglob("*"))
    assert onnx_export.main(["--model", str(tiny_teacher_dir), "--int8"]) == 130
    captured = capsys.readouterr()
    assert captured.err == f"onnx_export.py: interrupted; nothing written to {str(tiny_teacher_dir / 'onnx-int8')!r}\n"
    assert captured.out == "" and sorted(tiny_teacher_dir.rglob("*")) == before


def test_export_command_interrupted_over_an_earlier_export_leaves_it(tiny_teacher_dir, monkeypatch, capsys):
    from mdcompress import onnx_export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    export(tiny_teacher_dir)
    before = {p: p.read_bytes() for p in (tiny_teacher_dir / "onnx").iterdir()}
    monkeypatch.setattr(onnx_export, "_verify", interrupt)
    assert onnx_export.main(["--model", str(tiny_teacher_dir), "--overwrite"]) == 130
    assert capsys.readouterr().err == (f"onnx_export.py: interrupted; {str(tiny_teacher_dir / 'onnx')!r} is left as "
                                       f"it was\n")
    assert {p: p.read_bytes() for p in (tiny_teacher_dir / "onnx").iterdir()} == before
    assert sorted(p.name for p in tiny_teacher_dir.iterdir() if p.name.startswith(".")) == []


def test_export_interrupted_while_it_replaces_an_earlier_one_keeps_that_one(tiny_teacher_dir, monkeypatch, capsys):
    """--overwrite: Ctrl-C as the new export is renamed into place (the earlier one already renamed aside)
    puts the earlier one back whole; nothing is left beside it."""
    from mdcompress import onnx_export

    export(tiny_teacher_dir)
    out = tiny_teacher_dir / "onnx"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".onnx.tmp-"):  # the new export, moving in
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(onnx_export.os, "replace", replace)
    assert onnx_export.main(["--model", str(tiny_teacher_dir), "--overwrite"]) == 130
    assert capsys.readouterr().err == f"onnx_export.py: interrupted; {str(out)!r} is left as it was\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tiny_teacher_dir.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("int8", [False, True])
def test_backend_onnx_points_to_the_export_the_folder_has(int8, tiny_teacher_dir):
    """--backend onnx without --int8 on a folder with only onnx-int8/ says to add --int8 (and the other way round)."""
    export(tiny_teacher_dir, precision="float32" if int8 else "int8")
    flag = " --int8" if int8 else ""
    with pytest.raises(TranslateError) as refused:
        load_translator(tiny_teacher_dir, "onnx", int8=int8)
    assert str(refused.value) == (
        f"--backend onnx{flag}: {str(tiny_teacher_dir)!r} has no {'onnx-int8' if int8 else 'onnx'}/ export but has "
        f"{'onnx' if int8 else 'onnx-int8'}/: {'leave out' if int8 else 'add'} --int8 to use it, or run: "
        f"python -m mdcompress.onnx_export --model {tiny_teacher_dir}{flag}")


@pytest.mark.parametrize("case", ["float32_alone", "float32_beside_int8", "int8"])
def test_int8_with_an_export_folder_is_refused_unless_it_is_int8(case, tiny_teacher_dir, monkeypatch, capsys):
    """--int8 cannot change the precision of an export given as --model: with a float32 export it is refused in
    one line (naming the onnx-int8/ export beside it when there is one) instead of ignored; an int8 export runs."""
    float32 = export(tiny_teacher_dir, precision="float32")
    if case != "float32_alone":
        int8 = export(tiny_teacher_dir, precision="int8")
    model = int8 if case == "int8" else float32
    capsys.readouterr()  # what the exports printed
    code, out, err = translate_command(["--model", model, "--int8", "--max-new-tokens", "4"], monkeypatch, capsys,
                                       stdin=b"Hello.\n")
    if case == "int8":
        assert code == 0 and len(out.split("\n")) == 2, err
        return
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"--int8: {str(float32)!r} is already an ONNX export, of float32 weights" in err
    assert err.rstrip().endswith(f"give its int8 export --model {str(int8)!r}" if case == "float32_beside_int8"
                                 else f"python -m mdcompress.onnx_export --model {tiny_teacher_dir} --int8")


def test_readme_deploying_commands_work_as_written_after_the_default_job():
    """docs/deploying.md's "Export and translate" commands, run in order after the default job (which
    exported its student into onnx/ and onnx-int8/ of its output folder): no export aims at a folder that
    job wrote (refused without --overwrite), and every folder translated is one that job or an earlier
    command wrote."""
    import re
    import shlex
    from pathlib import Path

    from mdcompress.onnx_format import default_folder

    config = json.loads((REPO / "config.json").read_text())
    written = {Path(config["output_path"]) / name for name in config["export"]}
    page = (REPO / "docs" / "deploying.md").read_text(encoding="utf-8")
    section = page.split("\n## Export and translate\n")[1].split("\n## ")[0]
    lines = [shlex.split(line.split("#")[0].split("<")[0]) for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines() if line.startswith("python ")]
    lines = [args[2:] for args in lines if args[1] == "-m"]  # python -m mdcompress.<command> ...
    exports = [args for args in lines if args[0] == "mdcompress.onnx_export"]
    assert exports and [args for args in lines if args[0] == "mdcompress.translate"]
    for args in lines:
        model = args[args.index("--model") + 1]
        if args[0] == "mdcompress.translate":
            assert Path(model) in written, args
            continue
        out = Path(args[args.index("--out") + 1]) if "--out" in args else default_folder(
            model, "int8" if "--int8" in args else "float32")
        assert out not in written or "--overwrite" in args, args
        written.add(out)


@pytest.mark.parametrize("command", ["md-translate", "md-export-onnx"])
def test_installed_commands_name_themselves_in_errors(command, tmp_path, monkeypatch, capsys):
    """Run as its console entry point, a command's one-line error starts with that command's name."""
    from mdcompress import onnx_export
    from mdcompress import translate

    monkeypatch.setattr(sys, "argv", [f"/usr/local/bin/{command}", "--model", str(tmp_path / "nowhere"),
                                      *(["--out", str(tmp_path / "out")] if command == "md-export-onnx" else [])])
    assert (translate if command == "md-translate" else onnx_export).main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{command}: error: ") and err.count("\n") == 1 and "nowhere" in err, err


@pytest.mark.parametrize("beams", [1, 3])
def test_each_translation_is_bounded_by_its_source_alike_in_pytorch_and_onnx(beams, varied_teacher_dir, tiny_pairs,
                                                                             tmp_path):
    """A translation stops at ceil(max_length_factor × its source tokens) + MAX_LENGTH_MARGIN new tokens (ending
    with </s>), each sentence at its own bound, though its batch goes on: PyTorch and ONNX Runtime alike."""
    from mdcompress.translate import MAX_LENGTH_MARGIN, TorchTranslator, length_bounds, translate_ids

    torch_translator, onnx_translator = load_translator(varied_teacher_dir), load_translator(
        export(varied_teacher_dir, tmp_path / "onnx"))
    tokenizer = torch_translator.tokenizer
    ids = tokenizer([s for s, _ in tiny_pairs[:40]])["input_ids"]
    assert len({len(x) for x in ids}) > 5  # sentences of many lengths share batches
    bounds = length_bounds([len(x) for x in ids], 60, 0.5)
    assert bounds == [min(60, -(-len(x) // 2) + MAX_LENGTH_MARGIN) for x in ids]
    unbounded = translate_ids(torch_translator, ids, batch_size=16, num_beams=beams, max_new_tokens=60,
                              max_length_factor=None)
    expected = translate_ids(torch_translator, ids, batch_size=16, num_beams=beams, max_new_tokens=60,
                             max_length_factor=0.5)
    assert translate_ids(onnx_translator, ids, batch_size=16, num_beams=beams, max_new_tokens=60,
                         max_length_factor=0.5) == expected
    assert expected != unbounded  # the bound bites on this model, which rambles
    for translator in (torch_translator, onnx_translator):  # generate() itself: each row ends with </s> at its bound
        batch = ids[:8]
        longest = max(map(len, batch))
        input_ids = np.array([x + [tokenizer.pad_token_id] * (longest - len(x)) for x in batch], np.int64)
        mask = np.array([[1] * len(x) + [0] * (longest - len(x)) for x in batch], np.int64)
        rows = translator.generate(input_ids, mask, num_beams=beams, max_new_tokens=60, bounds=bounds[:8])
        for row, bound in zip(rows, bounds[:8]):
            row = [t for t in row if t != tokenizer.pad_token_id]
            assert len(row) <= bound and row[-1] == tokenizer.eos_token_id, (row, bound)
        assert any(len([t for t in row if t != tokenizer.pad_token_id]) == b for row, b in zip(rows, bounds)), rows
    assert isinstance(torch_translator, TorchTranslator)


def test_translate_command_max_length_factor(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """--max-length-factor: bounds the translations by their sources (default 2), none lifts the bound, and a value
    that is not a positive number is refused in one line."""
    stdin = b"Hello.\nI like tea.\n"
    outputs = {}
    for factor in ("none", "2", "0.1"):
        code, out, err = translate_command(["--model", tiny_teacher_dir, "--max-new-tokens", "40",
                                            "--max-length-factor", factor], monkeypatch, capsys, stdin=stdin)
        assert code == 0, err
        outputs[factor] = out
    code, out, err = translate_command(["--model", tiny_teacher_dir, "--max-new-tokens", "40"], monkeypatch, capsys,
                                       stdin=stdin)
    assert out == outputs["2"] and outputs["0.1"] != outputs["none"]
    for bad in ("0", "-1", "x", "inf"):
        code, out, err = translate_command(["--model", tiny_teacher_dir, "--max-length-factor", bad], monkeypatch,
                                           capsys, stdin=stdin)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert f"--max-length-factor: {bad!r} is not a positive number" in err


def test_int8_graphs_are_checked_after_quantization(make_tiny_marian, tiny_tokenizer, tmp_path):
    """The int8 graphs themselves are compared with PyTorch after quantization, with a tolerance
    relative to the logits' spread that rounding stays under and a wrong graph exceeds: the same
    graphs checked against the model with its feed-forward outputs negated are refused."""
    from mdcompress.onnx_export import INT8_TOLERANCE, _verify

    def varied(negate_fc2: bool = False):  # seeded noise: a fresh tiny model says nearly the same for every input
        model = make_tiny_marian()
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.add_(0.6 * torch.randn_like(p))
                if negate_fc2 and ".fc2." in name:
                    p.neg_()
        return model

    out = export(tmp_path / "x", tmp_path / "int8", "int8", model=varied(), tokenizer=tiny_tokenizer)
    info = json.loads((out / "onnx_export.json").read_text())
    assert 0 < info["int8_relative_error"] <= INT8_TOLERANCE / 2  # rounding: above zero, well within
    with pytest.raises(ExportError, match=r"^the int8 graphs differ from the PyTorch model by [0-9.]+ of the "):
        _verify(varied(negate_fc2=True), out, INT8_TOLERANCE, quantized=True)
