"""The spool file format: order kept, bounded, a crash's torn last record skipped with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers._spool import MAGIC, Spool, read_segment
from spendstream.errors import ConfigError


def replay(directory: Path) -> list[bytes]:
    """What the next emitter would send: every segment, in spool order."""
    spool = Spool(directory, 1 << 20)
    try:
        out = []
        while (segment := spool.take()) is not None:
            out += read_segment(segment.path)
        return out
    finally:
        spool.close()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=40),
    cut=st.integers(min_value=1, max_value=307),
)
def test_a_torn_last_record_is_skipped_and_every_earlier_one_kept_in_order(
    tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], cut: int
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = Spool(directory, 1 << 20)
    assert all(spool.append(p) for p in payloads)
    spool.close()
    (segment,) = directory.glob("*.spool")
    assert read_segment(segment) == payloads
    data = segment.read_bytes()
    cut = min(cut, 8 + len(payloads[-1]))  # somewhere inside the last record (header + payload)
    segment.write_bytes(data[:-cut])
    assert read_segment(segment) == payloads[:-1]


def test_a_corrupt_record_ends_its_segment_with_a_warning_and_later_segments_still_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, 40_000)  # segments of 5,000 bytes: four records each
    payloads = [bytes([i]) * 1000 for i in range(12)]  # three or more segments
    assert all(spool.append(p) for p in payloads)
    spool.close()
    first = sorted(tmp_path.glob("*.spool"))[0]
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + 1008 + 20] ^= 0xFF  # inside the body of the second record
    first.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="producers._spool"):
        replayed = replay(tmp_path)
    assert replayed == payloads[:1] + payloads[4:], [p[0] for p in replayed]
    assert "checksum does not match" in caplog.text
    assert "the 1 records before it are replayed" in caplog.text


def test_the_spool_refuses_beyond_max_bytes_and_resumes_after_a_segment_is_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10_000)
    accepted = 0
    while spool.append(b"x" * 492):  # 500 bytes a record
        accepted += 1
    assert accepted == 19, accepted  # 10,000 bytes less the segment headers
    assert spool.bytes <= 10_000
    segment = spool.take()
    assert segment is not None
    spool.remove(segment)
    assert spool.append(b"x" * 492)
    spool.close()


def test_what_close_could_not_deliver_replays_before_the_older_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    for p in (b"s1", b"s2"):
        spool.append(p)
    spool.write_front([b"m1", b"m2"])  # accepted before anything in the spool
    spool.close()
    assert replay(tmp_path) == [b"m1", b"m2", b"s1", b"s2"]
    again = Spool(tmp_path, 1 << 20)  # a second close on the same, still unread, spool
    again.write_front([b"m0"])
    again.close()
    assert replay(tmp_path) == [b"m0", b"m1", b"m2", b"s1", b"s2"]


def test_one_spool_directory_belongs_to_one_emitter(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    with pytest.raises(ConfigError, match="in use by another emitter"):
        Spool(tmp_path, 1 << 20)
    spool.close()
    Spool(tmp_path, 1 << 20).close()
