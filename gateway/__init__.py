"""The gateway (`spendstream gateway`): every LLM call of a team goes through it.

It holds the provider keys, authenticates the internal keys (gateway.keys), enforces model
tiers, budgets (a Guard on spend.control), fleet-wide rate limits (gateway.rates) and an optional
response cache, proxies to the provider with streams passed through as they arrive, and meters
every call with an Emitter (usage.raw). Built on producers/ and the contracts core only; see
docs/gateway.md.
"""
