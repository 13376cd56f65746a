"""Where the shipped contracts live: the Avro schemas, the ClickHouse DDL, the Kafka deploy files.

In a source checkout they are the top-level `schemas/`, `sql/` and `deploy/kafka/` folders; an
installed wheel carries the same files under `spendstream/_contracts/`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["contract_dir"]

_PACKAGED = Path(__file__).resolve().parent / "_contracts"
_SOURCE = Path(__file__).resolve().parent.parent
_SOURCE_NAMES = {"schemas": "schemas", "sql": "sql", "kafka": "deploy/kafka"}


def contract_dir(name: str) -> Path:
    """Return the folder holding contract `name` (`schemas`, `sql` or `kafka`)."""
    packaged = _PACKAGED / name
    if packaged.is_dir():
        return packaged
    return _SOURCE / _SOURCE_NAMES[name]
