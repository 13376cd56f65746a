"""`spendstream gateway`: the LLM gateway (gateway/), wired from Settings and run in the foreground.

Start order: broker reachable and topics present -> emitter (never waits for Kafka: it spools)
-> Guard, key store and rate-limit sync each read their topic to the end -> HTTP. Stop: HTTP first,
then the emitter flushes what it holds (the spool keeps the rest for the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from typing import Annotated, get_args

import aiohttp
import typer
from aiohttp import web

from gateway.cache import MemoryCache, RedisCache, ResponseCache
from gateway.errors import Family
from gateway.keys import KeyStore
from gateway.limits import FleetLimiter
from gateway.policy import Policy
from gateway.server import Gateway, build_app
from gateway.upstream import Upstream
from producers import Emitter, Guard
from spendstream.cli.console import say
from spendstream.cli.up import local_kafka
from spendstream.settings import PROVIDER_KEY_VARS, Settings
from spendstream.topics import ensure_topics, wait_for_broker

__all__ = ["register", "serve"]

FAMILIES: tuple[Family, ...] = get_args(Family)


def upstreams_of(settings: Settings) -> dict[Family, Upstream]:
    return {f: Upstream(f, getattr(settings, f"{f}_base_url"), settings.provider_key(f)) for f in FAMILIES}


async def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    progress: Callable[[str], None] = say,
    stop: asyncio.Event | None = None,
) -> None:
    """Run one gateway instance until `stop` is set (or SIGINT/SIGTERM)."""
    auth, bootstrap, topics = settings.kafka_auth, settings.bootstrap, settings.topics
    await wait_for_broker(bootstrap, timeout=30, kafka_auth=auth)
    await ensure_topics(bootstrap, topics, settings.partitions, kafka_auth=auth)
    policy = Policy.load(settings.policy_file)
    upstreams = upstreams_of(settings)
    instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    verify = settings.accepted_keys()
    emitter = Emitter(
        bootstrap_servers=bootstrap,
        service="gateway",
        topic=topics.usage_raw,
        spool_dir=settings.state_dir.expanduser() / f"gateway-spool-{port}",
        kafka_auth=auth,
    )
    guard = Guard(
        bootstrap_servers=bootstrap, topic=topics.spend_control, verify_keys=verify, kafka_auth=auth
    )
    keys = KeyStore(
        bootstrap_servers=bootstrap, topic=topics.gateway_keys, verify_keys=verify, kafka_auth=auth
    )
    limiter = FleetLimiter(
        bootstrap_servers=bootstrap, topic=topics.gateway_rates, instance_id=instance, kafka_auth=auth
    )
    cache: ResponseCache = (
        RedisCache(settings.redis_url.get_secret_value())
        if settings.redis_url is not None
        else MemoryCache(max_bytes=settings.cache_max_bytes)
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=10, sock_read=settings.gateway_upstream_timeout_seconds
    )
    async with contextlib.AsyncExitStack() as stack:
        await emitter.start()
        stack.push_async_callback(emitter.close)
        await guard.__aenter__()
        stack.push_async_callback(guard.__aexit__, None, None, None)
        await keys.start()
        stack.push_async_callback(keys.stop)
        await limiter.start()
        stack.push_async_callback(limiter.stop)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        )
        gateway = Gateway(
            upstreams=upstreams,
            keys=keys,
            policy=policy,
            emitter=emitter,
            guard=guard,
            limiter=limiter,
            cache=cache,
            session=session,
        )
        runner = web.AppRunner(
            build_app(gateway, max_body_bytes=settings.gateway_max_body_bytes), access_log=None
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, host, port).start()
        # What exists now (aiohttp, aiokafka, the keys, the schemas) lives as long as the gateway:
        # frozen, full collections stop rescanning it (their pauses are the gateway's p99).
        gc.collect()
        gc.freeze()
        keyed = ", ".join(
            f"{f}: {'key set' if u.api_key else 'NO KEY (' + PROVIDER_KEY_VARS[f][0] + ')'} -> {u.base_url}"
            for f, u in upstreams.items()
        )
        progress(f"gateway on http://{host}:{port}  ({len(keys.keys())} internal keys; {keyed})")
        progress(
            f"  OpenAI SDK: base_url=http://{host}:{port}/v1   Anthropic/Gemini: base_url=http://{host}:{port}"
        )
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        progress("gateway stopping: flushing usage events")


def register(app: typer.Typer) -> None:
    @app.command("gateway")
    def gateway_command(
        ctx: typer.Context,
        host: Annotated[str | None, typer.Option(help="Overrides SPENDSTREAM_GATEWAY_HOST.")] = None,
        port: Annotated[int | None, typer.Option(help="Overrides SPENDSTREAM_GATEWAY_PORT.")] = None,
    ) -> None:
        """Run the LLM gateway: provider keys in one place, internal keys, tiers, budgets, rate
        limits and cache, wire-compatible with the OpenAI, Anthropic and Gemini SDKs."""
        settings: Settings = ctx.obj
        access = logging.getLogger("spendstream.gateway.access")  # one line per request, timed
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d access %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
        if settings.local_kafka:
            kafka = local_kafka(settings)
            result = kafka.start(progress=say)
            say(f"Kafka {kafka.bootstrap} " + ("already running" if result.already_running else "started"))
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings, host or settings.gateway_host, port or settings.gateway_port))
