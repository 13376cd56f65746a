"""Obey the kill switch: read spend.control from the beginning, keep the latest state per scope.

The topic is compacted with key = scope, so a new subscriber learns the state of every scope.
A `blocked` signal holds until its window ends; `sequence` orders signals of one scope.

    .venv/bin/python examples/kill_switch.py checkout
"""

import asyncio
import sys
import time

from aiokafka import AIOKafkaConsumer

from spendstream.wire import default_codec

state: dict[str, dict] = {}  # scope -> latest ControlSignal


def allowed(project: str) -> bool:
    s = state.get(f"project:{project}")
    return s is None or s["state"] != "blocked" or s["window_end"] <= time.time_ns() // 1000


async def main(project: str) -> None:
    consumer = AIOKafkaConsumer(
        "spend.control", bootstrap_servers="127.0.0.1:9092", group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        async for msg in consumer:
            _, signal = default_codec().decode(msg.value)
            seen = state.get(signal["scope"])
            if seen is None or signal["sequence"] > seen["sequence"]:
                state[signal["scope"]] = signal
            print(
                f"{project}: {'allowed' if allowed(project) else 'BLOCKED'} "
                f"(last signal: {signal['scope']} {signal['state']})"
            )
    finally:
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "checkout"))
