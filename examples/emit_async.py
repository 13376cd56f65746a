"""Meter the calls of an asyncio service.

.venv/bin/spendstream up &            # in another terminal
.venv/bin/python examples/emit_async.py
"""

import asyncio

from producers import Emitter


async def main() -> None:
    async with Emitter(bootstrap_servers="127.0.0.1:9092", service="checkout-api") as emitter:
        for order in range(100):
            # ... call the model, then report what the provider's usage object said:
            await emitter.emit(
                project="checkout",
                team="commerce",
                user=f"customer-{order % 7}",
                provider="openai",
                model="gpt-4o-mini",
                input_tokens=900,  # uncached prompt tokens (OpenAI: prompt_tokens - cached_tokens)
                cached_input_tokens=300,
                output_tokens=120,
                tags={"feature": "order-summary"},
            )
        # leaving the block flushes: every accepted event is acknowledged by Kafka
    print("sent 100 usage events")


if __name__ == "__main__":
    asyncio.run(main())
