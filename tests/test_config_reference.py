"""docs/configuration.md is generated from the Config's fields: it must say what the code says."""

from pathlib import Path

from mdcompress.config import markdown

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "python -m mdcompress.config --markdown > docs/configuration.md"


def test_the_configuration_reference_is_the_generated_one():
    assert REFERENCE.read_text(encoding="utf-8") == markdown(), \
        f"docs/configuration.md differs from the Config's fields and help texts; regenerate it: {REGENERATE}"
