"""Meter the calls of plain synchronous code (scripts, Django, Flask, Celery tasks).

.venv/bin/python examples/emit_sync.py
"""

from producers import SyncEmitter

with SyncEmitter(bootstrap_servers="127.0.0.1:9092", service="nightly-report") as emitter:
    for _ in range(10):
        emitter.emit(
            project="batch-etl",
            provider="anthropic",
            model="claude-sonnet-4-20250514",
            input_tokens=4000,  # Anthropic input_tokens already exclude cache reads and writes
            cached_input_tokens=12_000,  # cache_read_input_tokens
            cache_write_tokens=0,  # cache_creation_input_tokens
            output_tokens=800,
        )
    print(f"sent {emitter.sent_events} events")  # close() at the end of the block delivers the rest
