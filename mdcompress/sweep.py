"""A size sweep: ``target_ratio`` (or ``k_info``) given as a list compresses the teacher once per value.

``compress_model.run_sweep`` runs the compressions, sharing the teacher's evaluation and the
sensitivity measurement; this module names their folders and turns their reports into the sweep's
table, its ``report.json`` and its BLEU-against-size curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SWEEPABLE = ("target_ratio", "k_info")


def sweep_key(config) -> str | None:
    """The config key swept over (its value is a list), or None for a single run."""
    return next((key for key in SWEEPABLE if isinstance(getattr(config, key), list)), None)


def folder_name(key: str, value) -> str:
    """The subfolder of one model of a sweep: ``ratio-0.5``, ``rank-16``."""
    return f"ratio-{value:g}" if key == "target_ratio" else f"rank-{value}"


def sweep_row(key: str, value, report: Mapping) -> dict:
    """One model of the sweep, from its report."""
    return {"value": value, "folder": folder_name(key, value), "params": report["student"]["params"],
            "compression_ratio": report["compression_ratio"], "size_mb": report["student"]["size_mb"],
            "bleu_decomposed": report["decomposed"]["bleu"], "chrf_decomposed": report["decomposed"]["chrf"],
            "bleu_student": report["student"]["bleu"], "chrf_student": report["student"]["chrf"],
            "train_seconds": report["train_seconds"]}


def sweep_report(key: str, rows: Sequence[Mapping], teacher: Mapping) -> dict:
    return {"sweep": key, "values": [row["value"] for row in rows], "teacher": dict(teacher), "rows": list(rows)}


def print_sweep(report: Mapping) -> None:
    teacher = report["teacher"]
    print(f"\nsize sweep over {report['sweep']}: BLEU against size")
    print(f"{'model':<14}{'params':>12}{'% teacher':>11}{'MB':>8}{'BLEU before':>13}{'BLEU after':>12}{'chrF':>8}")
    print(f"{'teacher':<14}{teacher['params']:>12,}{100.0:>10.1f}%{teacher['size_mb']:>8.2f}{'':>13}"
          f"{teacher['bleu']:>12.2f}{teacher['chrf']:>8.2f}")
    for row in report["rows"]:
        print(f"{row['folder']:<14}{row['params']:>12,}{100 * row['compression_ratio']:>10.1f}%{row['size_mb']:>8.2f}"
              f"{row['bleu_decomposed']:>13.2f}{row['bleu_student']:>12.2f}{row['chrf_student']:>8.2f}")
    print("(BLEU before: the decomposed model before recovery; after: the distilled student)")
