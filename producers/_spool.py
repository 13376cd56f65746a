"""The emitter's optional on-disk spool: accepted events that do not fit in memory, or that were not
delivered by `close()`, kept in files that the next emitter started on the same directory sends.

A spool directory holds segment files, replayed in the order of their names:

    <seq>.<sub>.spool    seq, sub: integers; sorted by (seq, sub). New segments get sub 1 and the
                         next seq; what close() could not deliver goes to a segment sorted just before
                         the oldest unread one (it was accepted before everything in it).
    .lock                held (flock) by the one emitter that owns the directory

A segment is the 8-byte magic `SSPOOL1\\n`, then records of

    length   4 bytes, big-endian: bytes of the payload
    crc32    4 bytes, big-endian: zlib.crc32 of the payload
    payload  one UsageEvent, Avro single-object encoding (the wire format of usage.raw)

Records are appended with one `write()` each (no user-space buffer), so a process that dies keeps
every record it wrote except perhaps the last; a machine crash can lose what the OS had not written
out (close() calls fsync). A reader stops at the first short or corrupt record of a segment, logs a
warning and goes on with the next segment. A segment is deleted only when Kafka has acknowledged
every event read from it, so a process that dies while replaying sends it again (at least once;
`event_id` makes the duplicates harmless downstream).

The spool is not thread-safe by itself: the emitter's buffer lock guards it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from spendstream.errors import ConfigError

__all__ = ["Segment", "Spool", "read_segment"]

MAGIC = b"SSPOOL1\n"
_RECORD = struct.Struct(">II")
_SUFFIX = ".spool"

log = logging.getLogger(__name__)


@dataclass
class Segment:
    """One spool file."""

    path: Path
    key: tuple[int, int]  # (seq, sub): replay order
    size: int
    records: int = 0  # written by this process (a segment left by another process: unknown, 0)
    pending: int = field(default=0, compare=False)  # batches sent from it, not yet acknowledged


def _key(path: Path) -> tuple[int, int] | None:
    parts = path.name.removesuffix(_SUFFIX).split(".")
    try:
        seq, sub = (int(p) for p in parts)
    except ValueError:
        return None
    return seq, sub


def _name(key: tuple[int, int]) -> str:
    return f"{key[0]:012d}.{key[1]}{_SUFFIX}"


def read_segment(path: Path) -> list[bytes]:
    """The payloads of a segment in order; a short or corrupt record ends it with a warning."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        log.warning("spool segment %s has no spool header (%d bytes): skipped", path, len(data))
        return []
    payloads, at = [], len(MAGIC)
    while at < len(data):
        if at + _RECORD.size > len(data):
            problem = "a truncated record header"
            break
        length, crc = _RECORD.unpack_from(data, at)
        payload = data[at + _RECORD.size : at + _RECORD.size + length]
        if len(payload) < length:
            problem = f"a truncated record ({len(payload)} of {length} bytes)"
            break
        if zlib.crc32(payload) != crc:
            problem = "a record whose checksum does not match"
            break
        payloads.append(payload)
        at += _RECORD.size + length
    else:
        return payloads
    log.warning(
        "spool segment %s ends with %s at byte %d (%d bytes ignored; the writing process stopped "
        "mid-write): the %d records before it are replayed",
        path,
        problem,
        at,
        len(data) - at,
        len(payloads),
    )
    return payloads


class Spool:
    """Segments in a directory owned by one emitter, bounded by `max_bytes` on disk."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = max(4096, min(max_bytes // 8, 4 << 20))
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigError(
                f"spool directory {self.directory} is in use by another emitter; give each "
                "emitter process its own spool_dir"
            ) from None
        self.unread: list[Segment] = []  # oldest first; the last may be open for appending
        found = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            key = _key(path)
            if key is None:
                log.warning(
                    "spool directory %s: %s is not a spool segment name; ignored", directory, path.name
                )
                continue
            found.append(Segment(path, key, path.stat().st_size))
        self.unread = sorted(found, key=lambda s: s.key)
        self.bytes = sum(s.size for s in self.unread)
        self.left_by_previous = len(self.unread)
        self._next_seq = self.unread[-1].key[0] + 1 if self.unread else 1
        self._fd: int | None = None  # open segment (always the last of `unread`)

    def append(self, payload: bytes) -> bool:
        """Append one record; False (nothing written) when the spool would exceed max_bytes or the
        write fails (the disk is full)."""
        record = _RECORD.pack(len(payload), zlib.crc32(payload)) + payload
        new = self._fd is None or self.unread[-1].size + len(record) > self.segment_bytes
        if self.bytes + len(record) + (len(MAGIC) if new else 0) > self.max_bytes:
            return False
        if new:
            self._close_open()
            self._open((self._next_seq, 1))
            self._next_seq += 1
        assert self._fd is not None
        segment = self.unread[-1]
        try:
            problem = "" if os.write(self._fd, record) == len(record) else "short write"
        except OSError as exc:
            problem = str(exc)
        if problem:  # e.g. the disk is full: undo a partial record, refuse this one
            os.ftruncate(self._fd, segment.size)
            log.warning("spool %s: cannot append (%s); the event is refused", self.directory, problem)
            return False
        segment.size += len(record)
        segment.records += 1
        self.bytes += len(record)
        return True

    def write_front(self, payloads: list[bytes]) -> Segment:
        """Write `payloads` to a new segment replayed before every unread one (regardless of max_bytes:
        these are events already accepted, and the alternative is to drop them)."""
        self._close_open()
        first = self.unread[0].key if self.unread else (self._next_seq, 1)
        segment = self._open((first[0], first[1] - 1), front=True)
        assert self._fd is not None
        os.write(self._fd, b"".join(_RECORD.pack(len(p), zlib.crc32(p)) + p for p in payloads))
        size = os.fstat(self._fd).st_size
        self.bytes += size - segment.size
        segment.size, segment.records = size, len(payloads)
        self._close_open()
        return segment

    def take(self) -> Segment | None:
        """The oldest unread segment (closed first if it is open), to be read and sent."""
        if not self.unread:
            return None
        if len(self.unread) == 1:
            self._close_open()
        return self.unread.pop(0)

    def remove(self, segment: Segment) -> None:
        """Every event of `segment` is acknowledged: delete it."""
        segment.path.unlink(missing_ok=True)
        self.bytes -= segment.size

    def close(self) -> None:
        """Close the open segment (fsync'd) and release the directory."""
        self._close_open()
        os.close(self._lock_fd)

    def _open(self, key: tuple[int, int], front: bool = False) -> Segment:
        path = self.directory / _name(key)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        os.write(self._fd, MAGIC)
        segment = Segment(path, key, len(MAGIC))
        self.bytes += len(MAGIC)
        if front:
            self.unread.insert(0, segment)
        else:
            self.unread.append(segment)
        return segment

    def _close_open(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
