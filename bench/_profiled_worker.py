"""Run the `spendstream` command under cProfile, profiling only between two signals.

    python bench/_profiled_worker.py OUT.prof up --log-level warning

PROFILE_START starts the profiler and PROFILE_STOP stops it, so start-up and shut-down stay out
of the figures; the stats are written to OUT.prof when the process exits (SIGTERM stops the
worker cleanly). The signals are two real-time signals at the top of the range: mode's worker
owns SIGINT, SIGTERM, SIGUSR1 and SIGUSR2, and embedded ClickHouse (chDB) takes SIGRTMIN for its
stack-trace collection. cProfile sees the main thread only: ClickHouse inserts run in
`asyncio.to_thread` workers and appear only as time the event loop spent elsewhere.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from pathlib import Path
from types import FrameType

# Run as a script, this file's folder leads sys.path, and bench/gateway.py would hide the gateway
# package the CLI imports: the repository goes first instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

PROFILE_START = signal.SIGRTMAX - 2
PROFILE_STOP = signal.SIGRTMAX - 1


def main() -> None:
    out = sys.argv[1]
    profiler = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()

    signal.signal(PROFILE_START, start)
    signal.signal(PROFILE_STOP, stop)
    sys.argv = ["spendstream", *sys.argv[2:]]
    from spendstream.cli import main as spendstream

    try:
        spendstream()
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
