"""Benchmarks: run each from the repository root as ``python -m benchmarks.<name>``."""

import json
from pathlib import Path


def write_json(path: str | Path, value) -> None:
    """What ``--json PATH`` writes: ``value`` as indented JSON, the folder made if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2) + "\n")
