"""The docs name every setting and every topic, so they cannot drift from the code silently."""

from pathlib import Path

from spendstream.settings import Settings
from spendstream.topics import Topics

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [n for n in Settings.model_fields if f"`SPENDSTREAM_{n.upper()}`" not in text]
    assert missing == []


def test_every_topic_is_documented() -> None:
    text = (DOCS / "event-format.md").read_text() + (DOCS / "operations.md").read_text()
    assert [t for t in Topics().all() if f"`{t}`" not in text] == []
