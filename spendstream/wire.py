"""Avro single-object encoding: the wire format of every spendstream topic.

A message is `C3 01` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
Parsing Canonical Form + the Avro binary body (Avro spec, "Single-object encoding"). Any
language's Avro library can write it; no schema registry is needed. A reader finds the writer
schema by fingerprint among every schema kept in `schemas/` (current files and `schemas/history/`)
and resolves it into the current schema of the same name, so old writers keep working.

Inside Python, logical types are read and written as their plain Avro types: timestamps are
integer microseconds since the epoch (UTC) and UUIDs are strings. The bytes are identical (a
logical type only annotates the schema) and decoding is much faster without the conversions.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, load_schema, to_parsing_canonical_form

from spendstream.contracts import contract_dir
from spendstream.errors import DecodeError

__all__ = ["MAGIC", "Codec", "avro_long", "default_codec"]

MAGIC = b"\xc3\x01"
_HEADER = len(MAGIC) + 8
_NAMESPACE = "dev.spendstream."

Record = dict[str, Any]


def _strip_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_strip_logical_types(s) for s in schema]
    return schema


def _type_name(schema: Any) -> Any:
    """The Avro type of a field's schema: "bytes" for {"type": "bytes", "precision": ...} too."""
    return schema.get("type") if isinstance(schema, dict) else schema


@dataclass(frozen=True)
class _Schema:
    name: str  # short name, e.g. "UsageEvent"
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO
    parsed: Any  # fastavro parsed schema, logical types stripped
    # Defaults of bytes fields (decimals included): the schema writes them as strings (Avro spec)
    # and fastavro would write that str, so encode() fills them in as bytes when a record leaves
    # the field out.
    bytes_defaults: dict[str, bytes]


def _load(path: Path) -> _Schema:
    expanded = load_schema(str(path), _write_hint=False)
    canonical = to_parsing_canonical_form(expanded)
    # fastavro renders the fingerprint as the hex of its little-endian bytes: the wire order.
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    full_name = json.loads(canonical)["name"]
    plain = _strip_logical_types(json.loads(json.dumps(copy.deepcopy(expanded))))
    bytes_defaults = {
        f["name"]: f["default"].encode("latin-1")
        for f in plain["fields"]
        if "bytes" in (f["type"], _type_name(f["type"])) and isinstance(f.get("default"), str)
    }
    return _Schema(
        full_name.removeprefix(_NAMESPACE), fp, parse_schema(plain, _write_hint=False), bytes_defaults
    )


def avro_long(value: int) -> bytes:
    """One Avro long: a zigzag varint (what the meter's PricedBatch writer and the sink's Avro
    framing write around bytes they never decode)."""
    if not -(2**63) <= value < 2**63:
        raise OverflowError(f"{value} does not fit an Avro long")
    z = (value << 1) ^ (value >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


class Codec:
    """Encode and decode Avro single-object messages for the schemas in one folder."""

    def __init__(self, schema_dir: Path) -> None:
        self._current: dict[str, _Schema] = {}
        self._by_fingerprint: dict[bytes, _Schema] = {}
        for path in sorted(schema_dir.glob("*.avsc")):
            schema = _load(path)
            self._current[schema.name] = schema
            self._by_fingerprint[schema.fingerprint] = schema
        history = schema_dir / "history"
        for path in sorted(history.glob("*.avsc")) if history.is_dir() else []:
            schema = _load(path)
            self._by_fingerprint.setdefault(schema.fingerprint, schema)
        if not self._current:
            raise FileNotFoundError(f"no .avsc schemas in {schema_dir}")

    @property
    def names(self) -> list[str]:
        return sorted(self._current)

    def fingerprint(self, name: str) -> bytes:
        return self._current[name].fingerprint

    def encode(self, name: str, record: Record) -> bytes:
        """Encode `record` with the current schema `name` (e.g. "UsageEvent")."""
        schema = self._current[name]
        if not schema.bytes_defaults.keys() <= record.keys():
            record = {**schema.bytes_defaults, **record}
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        schemaless_writer(buf, schema.parsed, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[str, Record]:
        """Return (schema name, record) for a single-object message; raise DecodeError if it is not one."""
        if len(data) < _HEADER or data[:2] != MAGIC:
            raise DecodeError(
                "not an Avro single-object message (must start with C3 01 and an 8-byte schema "
                "fingerprint; see docs/event-format.md)"
            )
        writer = self._by_fingerprint.get(data[2:_HEADER])
        if writer is None:
            raise DecodeError(
                f"unknown writer schema fingerprint {data[2:_HEADER].hex()}; "
                "publish with a schema from schemas/ (or add its .avsc to schemas/history/)"
            )
        reader = self._current[writer.name]
        buf = io.BytesIO(data)
        buf.seek(_HEADER)
        try:
            if reader is writer:
                record = schemaless_reader(buf, writer.parsed, None)
            else:
                record = schemaless_reader(buf, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt {writer.name} body: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after a {writer.name} body")
        return writer.name, record  # type: ignore[return-value]


_default: Codec | None = None


def default_codec() -> Codec:
    """The codec for the shipped `schemas/` folder (loaded once)."""
    global _default
    if _default is None:
        _default = Codec(contract_dir("schemas"))
    return _default
