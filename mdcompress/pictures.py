"""Pictures of what compression did, and ``report.md``, the page that shows them with the report's table.

Written into the output folder next to ``report.json`` (PNG, matplotlib's non-interactive Agg canvas;
no window, no display needed):

- ``spectrum.png``  the singular values of each decomposed layer (relative to its largest), grouped by
  kind (attention, feed-forward, embedding), with the chosen rank marked on each curve;
- ``ranks.png``     the rank of each decomposed layer, against its no-saving bound;
- ``training.png``  each loss term during distillation and the held-out loss;
- ``sweep.png``     for a size sweep: BLEU against size (teacher, decomposed before recovery, student).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

KINDS = ("attention", "feed-forward", "embedding", "other")
COLOURS = {"attention": "tab:blue", "feed-forward": "tab:orange", "embedding": "tab:green", "other": "tab:grey"}
ROWS = ("teacher", "decomposed", "student", "student_int8", "student_onnx", "student_onnx_int8")


def layer_kind(name: str) -> str:
    """attention / feed-forward / embedding / other, from a module name (Marian's and its relatives')."""
    last = name.rsplit(".", 1)[-1]
    if "attn" in name or last in ("q_proj", "k_proj", "v_proj", "out_proj"):
        return "attention"
    if last in ("fc1", "fc2", "wi", "wo", "dense") or "ffn" in name or "mlp" in name:
        return "feed-forward"
    if "embed" in name or last in ("shared", "lm_head"):
        return "embedding"
    return "other"


def short_name(name: str) -> str:
    """``model.encoder.layers.0.self_attn.q_proj`` → ``enc0.self_attn.q_proj`` (labels that fit a chart)."""
    for long, short in (("model.encoder.layers.", "enc"), ("model.decoder.layers.", "dec"), ("model.", "")):
        if name.startswith(long):
            return short + name[len(long):]
    return name


def _figure(width: float, height: float, panels: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, no interactive backend

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _save(figure, path: Path) -> Path:
    figure.savefig(path, format="png")  # the Agg canvas a bare Figure comes with
    return path


def spectrum_picture(path: Path, spectra: Mapping[str, Sequence[float]], ranks: Mapping[str, int]) -> Path:
    """Each layer's singular values σ_i/σ_1 (log scale) against i, one panel per kind, the chosen
    rank r marked on its curve (the values after it are what the factorization drops)."""
    kinds = [k for k in KINDS if any(layer_kind(n) == k for n in ranks)]
    figure, axes = _figure(4.2 * len(kinds), 3.4, len(kinds))
    for ax, kind in zip(axes, kinds):
        names = [n for n in ranks if layer_kind(n) == kind]
        for name in names:
            s = [v / spectra[name][0] if spectra[name][0] > 0 else 0.0 for v in spectra[name]]
            ax.plot(range(1, len(s) + 1), s, color=COLOURS[kind], alpha=0.35, linewidth=0.8)
            r = ranks[name]
            ax.plot([r], [s[r - 1]], "o", color="black", markersize=3)
        ax.set_yscale("log")
        ax.set_title(f"{kind} ({len(names)} layer{'s' if len(names) > 1 else ''})", fontsize=10)
        ax.set_xlabel("singular value index i")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("σ_i / σ_1  (● chosen rank)")
    figure.suptitle("singular-value spectrum of each decomposed layer", fontsize=11)
    return _save(figure, path)


def layer_group(name: str) -> str:
    """The transformer layer a module belongs to (``encoder 0``, ``decoder 5``), else its short name:
    the tick labels of ``ranks.png``, one per group of bars."""
    for long, short in (("model.encoder.layers.", "encoder"), ("model.decoder.layers.", "decoder")):
        if name.startswith(long):
            return f"{short} {name[len(long):].split('.', 1)[0]}"
    return short_name(name)


def ranks_picture(path: Path, ranks: Mapping[str, int], bounds: Mapping[str, int]) -> Path:
    """``ranks.png``: ``ranks_figure`` saved."""
    return _save(ranks_figure(ranks, bounds), path)


def ranks_figure(ranks: Mapping[str, int], bounds: Mapping[str, int]):
    """A bar per decomposed layer: its rank, over a pale bar of its no-saving bound; bars grouped by
    transformer layer (one tick label each, a line between groups), coloured by kind, the legend
    outside the bars."""
    names = list(ranks)
    figure, (ax,) = _figure(max(6.0, 0.16 * len(names) + 3.5), 4.0)
    x = range(len(names))
    ax.bar(x, [bounds[n] for n in names], color="lightgrey", label="no-saving bound")
    ax.bar(x, [ranks[n] for n in names], color=[COLOURS[layer_kind(n)] for n in names])
    for kind in KINDS:
        if any(layer_kind(n) == kind for n in names):
            ax.bar([0], [0], color=COLOURS[kind], label=kind)  # legend entries only
    groups = []  # (label, first bar, last bar) in module order
    for i, name in enumerate(names):
        if groups and groups[-1][0] == layer_group(name):
            groups[-1][2] = i
        else:
            groups.append([layer_group(name), i, i])
    ax.set_xticks([(first + last) / 2 for _, first, last in groups], [label for label, _, _ in groups],
                  rotation=90 if len(groups) > 0.6 * len(names) else 45, ha="center" if len(groups) > 0.6 * len(names)
                  else "right", fontsize=9)
    for _, first, _ in groups[1:]:
        ax.axvline(first - 0.5, color="black", linewidth=0.6, alpha=0.4)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("rank")
    ax.set_xlabel("decomposed layers, grouped by transformer layer (module order within each)")
    ax.set_title("rank of each decomposed layer", fontsize=11)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return figure


def _plain_log_ticks(axis, low: float, high: float) -> None:
    """Log-scale ticks labelled as plain numbers (``2``, ``1.5``, ``0.05``; not ``2×10^0``), as many
    per decade as the range leaves room for."""
    from matplotlib import ticker

    decades = math.log10(high / low) if low > 0 and high > low else 0.0
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades < 1 else (1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(ticker.NullLocator())


def loss_lines(curve: Sequence[Mapping]) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, points) per line of the training-loss panel: a term equal to another at every point (the
    total with one term alone) shares its line, labelled ``loss = ce``; terms never above 0 are left out."""
    terms = sorted((k for k in (curve[0] if curve else {}) if k not in ("step", "seconds")), key=lambda k: k != "loss")
    lines: list[tuple[str, list[tuple[int, float]]]] = []
    for term in terms:
        points = [(p["step"], p[term]) for p in curve if term in p and p[term] > 0]
        if not points:
            continue
        same = next((i for i, (_, other) in enumerate(lines) if other == points), None)
        if same is None:
            lines.append((term, points))
        else:
            lines[same] = (f"{lines[same][0]} = {term}", points)
    return lines


def training_picture(path: Path, curve: Sequence[Mapping], history: Sequence[Mapping],
                     held_out: Sequence[Mapping] = ()) -> Path:
    """``training.png``: ``training_figure`` saved."""
    return _save(training_figure(curve, history, held_out), path)


def training_figure(curve: Sequence[Mapping], history: Sequence[Mapping], held_out: Sequence[Mapping] = ()):
    """Left: each loss term (and the weighted total) during distillation, averaged between the
    recorded points, on a log scale with plain tick labels, equal terms as one line; right: the
    held-out cross-entropy (``eval_ce``) at each evaluation (``history``'s and the ``held_out`` points
    between them), on the same steps axis."""
    figure, (left, right) = _figure(10.0, 3.6, 2)
    lines = loss_lines(curve)
    for label, points in lines:
        left.plot(*zip(*points), label=label, linewidth=1.5 if label.startswith("loss") else 1.0)
    if lines:
        values = [v for _, points in lines for _, v in points]
        left.set_yscale("log")
        _plain_log_ticks(left.yaxis, min(values), max(values))
        left.legend(fontsize=8)
    left.set_xlabel("optimizer step")
    left.set_title("training loss terms", fontsize=10)
    left.grid(alpha=0.3)
    held_out = sorted({h["step"]: h["eval_ce"] for h in [*held_out, *history] if "eval_ce" in h}.items())
    if held_out:
        right.plot(*zip(*held_out), "o-", color="tab:red")
        for step, value in held_out if len(held_out) <= 6 else ():
            right.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 6), ha="center",
                           fontsize=8)
        if len(held_out) < 4:  # the eval cadence is the run's: eval_steps 0 evaluates once per epoch
            right.text(0.02, 0.04, "one point per evaluation; eval_steps sets how often (0: once per epoch)",
                       transform=right.transAxes, fontsize=7, color="dimgrey")
        right.margins(y=0.2)
    if lines or held_out:
        steps = [s for _, points in lines for s, _ in points] + [s for s, _ in held_out]
        right.set_xlim(left.get_xlim() if lines else (0, max(steps) * 1.05))
    right.set_xlabel("optimizer step")
    right.set_title("held-out cross-entropy", fontsize=10)
    right.grid(alpha=0.3)
    return figure


def sweep_picture(path: Path, rows: Sequence[Mapping], teacher: Mapping) -> Path:
    """BLEU against size (MB, float32): the teacher, and per sweep value the decomposed model
    before recovery and the student after it."""
    figure, (ax,) = _figure(6.0, 4.0)
    rows = sorted(rows, key=lambda row: row["size_mb"])
    sizes = [row["size_mb"] for row in rows]
    ax.plot(sizes, [row["bleu_decomposed"] for row in rows], "s--", color="tab:grey",
            label="decomposed (before recovery)")
    ax.plot(sizes, [row["bleu_student"] for row in rows], "o-", color="tab:blue", label="student (after recovery)")
    for row in rows:
        ax.annotate(row["value"], (row["size_mb"], row["bleu_student"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.plot([teacher["size_mb"]], [teacher["bleu"]], "*", color="black", markersize=12, label="teacher")
    ax.set_xlabel("size (MB, float32 weights)")
    ax.set_ylabel("BLEU")
    ax.set_title("BLEU against size", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------
# report.md


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def model_rows(report: Mapping) -> list[list[str]]:
    """The rows of the report's model table: name, params, % teacher, BLEU, chrF, MB."""
    teacher = report["teacher"]["params"]
    rows = []
    for name in ROWS:
        row = report.get(name)
        if row is not None:
            size = row.get("size_mb")
            rows.append([name, f"{row['params']:,}", f"{100 * row['params'] / teacher:.1f}%", f"{row['bleu']:.2f}",
                         f"{row['chrf']:.2f}", "" if size is None else f"{size:.2f}"])
    return rows


def write_run_pictures(folder: str | Path, report: Mapping, spectra: Mapping[str, Sequence[float]],
                       bounds: Mapping[str, int]) -> list[Path]:
    """The pictures of one run and ``report.md`` embedding them, written into ``folder``."""
    folder = Path(folder)
    ranks = report["ranks"]
    pictures = [spectrum_picture(folder / "spectrum.png", spectra, ranks),
                ranks_picture(folder / "ranks.png", ranks, bounds),
                training_picture(folder / "training.png", report.get("loss_curve", []), report.get("history", []),
                                 report.get("held_out_curve", []))]
    summary = (f"compression ratio {report['compression_ratio']:.3f} (student params / teacher params); "
               f"{report['layers_decomposed']} layers decomposed; distilled in {report['train_seconds'] / 60:.1f} min "
               f"({report['optimizer_steps']:,} steps, {report['train_pairs']:,} pairs); evaluated on "
               f"{report['eval_pairs']:,} pairs; {report['bleu_signature']}")
    text = ["# Compression report", "",
            markdown_table(["model", "params", "% teacher", "BLEU", "chrF", "MB"], model_rows(report)), "",
            summary, "", "All numbers are in `report.json`.", "",
            "## Singular values and the chosen ranks", "", "![spectrum](spectrum.png)", "", "![ranks](ranks.png)", "",
            "## Distillation", "", "![training](training.png)", ""]
    (folder / "report.md").write_text("\n".join(text), encoding="utf-8")
    return [*pictures, folder / "report.md"]


def write_sweep_pictures(folder: str | Path, sweep: Mapping) -> list[Path]:
    """``sweep.png`` and a ``report.md`` with the sweep's table, written into ``folder``."""
    folder = Path(folder)
    picture = sweep_picture(folder / "sweep.png", sweep["rows"], sweep["teacher"])
    teacher = sweep["teacher"]
    rows = [["teacher", "", f"{teacher['params']:,}", "100.0%", f"{teacher['size_mb']:.2f}", "",
             f"{teacher['bleu']:.2f}", f"{teacher['chrf']:.2f}"]]
    rows += [[f"[{row['value']}]({row['folder']}/report.md)", row["folder"], f"{row['params']:,}",
              f"{100 * row['compression_ratio']:.1f}%", f"{row['size_mb']:.2f}", f"{row['bleu_decomposed']:.2f}",
              f"{row['bleu_student']:.2f}", f"{row['chrf_student']:.2f}"] for row in sweep["rows"]]
    text = [f"# Size sweep over {sweep['sweep']}", "",
            markdown_table([sweep["sweep"], "folder", "params", "% teacher", "MB", "BLEU decomposed", "BLEU student",
                            "chrF student"], rows), "",
            "Each model, its report and its pictures are in its own folder. All numbers are in `report.json`.", "",
            "![BLEU against size](sweep.png)", ""]
    (folder / "report.md").write_text("\n".join(text), encoding="utf-8")
    return [picture, folder / "report.md"]
