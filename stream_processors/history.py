"""The history writer: the ClickHouse side of spendstream, in a process of its own.

    usage.priced, usage.dlq --sink--> ClickHouse;   /sql, /reprice, /flush, /health (HTTP, token)

The sink decodes every priced event into a row. In the worker's event loop that CPU (about a
sixth of the loop at 5,000 events/s) sat between a budget crossing and its signal; here it runs
beside it. Embedded chDB admits one process per database, so the queries and re-pricing live
here too; the meter workers answer the same URLs by forwarding them (`spendstream sql`, `prices
reprice`, the demo and the tests are unchanged).

It runs in one of two ways, through one code path (`_serve`):

- `HistoryProcess` (`spendstream up`, role all): the worker spawns it as its child on a random
  port of 127.0.0.1, with a token drawn for this start and handed over the spawn pipe (never on
  a command line or in the environment). It stops when the worker dies, even by `kill -9`, so a
  restarted worker can open the database again; the worker restarts it when it dies alone.
- `run_standalone` (`spendstream up --role history`): in the foreground, on
  SPENDSTREAM_HISTORY_HOST:SPENDSTREAM_HISTORY_PORT, for any number of meter workers
  (`--role meter`, SPENDSTREAM_HISTORY_URL). Its token is SPENDSTREAM_HISTORY_TOKEN if set (the
  same on every host), else a new one per start written to `<state_dir>/history.token` (mode
  0600, replaced atomically), which meter workers on the same host and state dir read.
  `RemoteHistory` is the meter workers' handle on it.

Every request but `GET /health` must carry the token (`Authorization: Bearer <token>`): other
users and processes get 401. Users' SQL runs read-only under ClickHouse's limits
(stream_processors/store.py), in a thread and a session of its own: a long query is stopped at
`SPENDSTREAM_QUERY_TIMEOUT_SECONDS` and never holds back the sink. SIGTERM: the sink flushes what
it holds, commits, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from decimal import Decimal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from aiohttp import web

from spendstream.errors import QueryError, SpendstreamError
from spendstream.settings import Settings
from spendstream.wire import default_codec
from stream_processors.feeds import PriceFeed
from stream_processors.pricing import Catalogue
from stream_processors.repricer import reprice
from stream_processors.sink import Sink
from stream_processors.store import ClickHouseStore, QueryLimits

__all__ = ["HistoryEndpoint", "HistoryProcess", "RemoteHistory", "run_standalone", "write_token_file"]

log = logging.getLogger(__name__)

_READY_TIMEOUT = 120.0  # seconds: migrating a server over the network can be slow
_OPEN_RETRY = 30.0  # seconds a new process retries a database the previous one is still closing


class HistoryEndpoint(Protocol):
    """Where a worker sends /sql, /reprice, /flush and /health, with which headers (the token)."""

    @property
    def url(self) -> str: ...

    @property
    def headers(self) -> dict[str, str]: ...


class RemoteHistory:
    """A history writer started on its own (`spendstream up --role history`) at `url`. The token
    is `token` if given (SPENDSTREAM_HISTORY_TOKEN), else read from `token_file` at each request:
    a restarted writer's new token is picked up without restarting the meter worker."""

    def __init__(self, url: str, token: str | None, token_file: Path) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._token_file = token_file

    @property
    def headers(self) -> dict[str, str]:
        token = self._token
        if token is None:
            try:
                token = self._token_file.read_text().strip()
            except OSError:  # not written yet (the writer is starting) or another host: 401 says what to do
                return {}
        return {"Authorization": f"Bearer {token}"}


class HistoryProcess:
    """The parent's handle on its child history process: `start()` returns once the process
    serves; `url` is where."""

    def __init__(self, settings: Settings, loglevel: str = "info") -> None:
        self._settings = settings
        self._loglevel = loglevel
        self._process: BaseProcess | None = None
        self._pipe: Connection | None = None  # the spawned process's "ready" comes on it
        self._token = ""
        self.url = ""
        self.headers: dict[str, str] = {}  # carry the token of the current start
        self.applied: list[str] = []  # migrations the last start applied
        self.served = threading.Event()  # set once the first start serves (url and headers set)

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the process and return at once: the caller does other work (imports, its own
        start) while the child imports ClickHouse and migrates, then calls `wait_ready()`."""
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent has threads and sockets
        parent, child = ctx.Pipe(duplex=False)
        token = secrets.token_urlsafe(32)  # a new one per start; the spawn pipe carries it
        process = ctx.Process(
            target=_main,
            args=(self._settings, self._loglevel, os.getpid(), child, token),
            name="spendstream-history",
            daemon=False,
        )
        process.start()
        child.close()
        self._process, self._pipe, self._token = process, parent, token

    def wait_ready(self) -> None:
        """Return once the process spawned serves (`url`, `headers` and `applied` set);
        SpendstreamError if it exits, reports a ClickHouse error, or is not ready in time."""
        process, parent, token = self._process, self._pipe, self._token
        if process is None or parent is None:
            raise RuntimeError("wait_ready() before spawn()")
        self._pipe = None
        deadline = time.monotonic() + _READY_TIMEOUT
        while not parent.poll(0.2):
            if not process.is_alive():
                raise SpendstreamError(f"the history process exited ({process.exitcode}) while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise SpendstreamError(f"the history process was not ready in {_READY_TIMEOUT:.0f} s")
        status, detail = parent.recv()
        parent.close()
        if status != "ready":
            process.join(10)
            raise SpendstreamError(f"ClickHouse: {detail}")
        port, self.applied = detail
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.served.set()

    @property
    def exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (the sink flushes), then SIGKILL if it does not exit in `timeout` seconds."""
        process, self._process = self._process, None
        if process is None or not process.is_alive():
            return
        process.terminate()
        process.join(timeout)
        if process.is_alive():
            log.error("the history process did not stop in %.0f s; killing it", timeout)
            process.kill()
            process.join()


def _main(settings: Settings, loglevel: str, parent_pid: int, conn: Connection, token: str) -> None:
    """Entry point of the child process (spawned: it starts from a fresh interpreter)."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGTERM when the worker dies
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the worker stops us
    _configure(settings, loglevel)

    async def child() -> None:
        try:
            store, applied = await _open_store(settings)
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            raise SystemExit(1) from exc

        def ready(port: int) -> None:
            conn.send(("ready", (port, applied)))
            conn.close()

        await _serve(
            settings,
            store,
            token,
            ("127.0.0.1", 0),
            ready=ready,
            alive=lambda: os.getppid() == parent_pid,  # the worker is gone: stop too
            stop_on=(signal.SIGTERM,),
        )

    asyncio.run(child())


def run_standalone(settings: Settings, loglevel: str, say: Callable[[str], None]) -> None:
    """`spendstream up --role history`: migrate ClickHouse, then sink and serve in the foreground
    until SIGTERM or SIGINT (the sink flushes what it holds)."""
    _configure(settings, loglevel)

    async def standalone() -> None:
        store, applied = await _open_store(settings)
        say(
            f"ClickHouse database {settings.clickhouse_database}"
            + (f": applied {', '.join(applied)}" if applied else ": schema up to date")
        )
        if settings.history_token is not None:
            token, where = settings.history_token.get_secret_value(), "SPENDSTREAM_HISTORY_TOKEN"
        else:
            token, where = write_token_file(settings.history_token_file), str(settings.history_token_file)

        def ready(port: int) -> None:
            say(
                f"history writer: http://{settings.history_host}:{port} (token: {where}); "
                f"meter workers: SPENDSTREAM_HISTORY_URL=http://<this host>:{port}; Ctrl-C stops"
            )

        await _serve(
            settings,
            store,
            token,
            (settings.history_host, settings.history_port),
            ready=ready,
            alive=lambda: True,
            stop_on=(signal.SIGTERM, signal.SIGINT),
        )

    asyncio.run(standalone())


def write_token_file(path: Path) -> str:
    """A new token, written to `path` with mode 0600 (a temporary file renamed over it, so a
    reader sees the old token or the new one, never a part); returns it."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def _configure(settings: Settings, loglevel: str) -> None:
    os.nice(settings.history_nice)  # the budget path first; usage.priced holds what waits
    # The whole process is the history writer's: its logging replaces the CLI's (warnings only,
    # aiokafka silenced), so the sink's flushes and Kafka's troubles are seen.
    logging.basicConfig(
        level=loglevel.upper(),
        format="[%(asctime)s] [history %(process)d] [%(levelname)s] %(message)s",
        force=True,
    )
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)


async def _open_store(settings: Settings) -> tuple[ClickHouseStore, list[str]]:
    deadline = time.monotonic() + _OPEN_RETRY
    while True:
        try:
            store = ClickHouseStore(settings.dsn, settings.clickhouse_database, QueryLimits.of(settings))
            return store, store.migrate()
        except Exception as exc:
            # A previous history process of a killed worker may still be flushing and closing.
            if time.monotonic() > deadline or not settings.dsn.startswith("chdb://"):
                raise
            log.warning("ClickHouse not open yet (%s); retrying", exc)
            await asyncio.sleep(1)


async def _serve(
    settings: Settings,
    store: ClickHouseStore,
    token: str,
    address: tuple[str, int],
    *,
    ready: Callable[[int], None],
    alive: Callable[[], bool],
    stop_on: tuple[signal.Signals, ...],
) -> None:
    """Sink and serve on `address` (port 0: any free one) until a `stop_on` signal or `alive()`
    is false; `ready(port)` once the sink consumes. Then flush the sink and close the store."""
    codec = default_codec()
    catalogue = Catalogue.load(fallback=settings.unpriced_fallback)
    sink = Sink(
        bootstrap=settings.bootstrap,
        kafka_auth=settings.kafka_auth,
        topics=settings.topics,
        group_id=f"{settings.worker_id}-sink",
        store=store,
        codec=codec,
        max_rows=settings.sink_max_rows,
        max_seconds=settings.sink_max_seconds,
    )
    prices = PriceFeed(
        topic=settings.topics.prices,
        catalogue=catalogue,
        bootstrap=settings.bootstrap,
        kafka_auth=settings.kafka_auth,
        codec=codec,
        dead_letter=_dead_lettered_by_the_worker,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in stop_on:
        loop.add_signal_handler(signum, stop.set)

    runner = web.AppRunner(_web(store, sink, prices, token, settings.query_max_concurrent), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart binds the same port at once
    sock.bind(address)
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    await sink.start()
    await prices.start()
    ready(port)
    log.info(
        "history writer serving on %s:%d (token required): sink on %s",
        address[0],
        port,
        settings.topics.usage_priced,
    )
    try:
        while not stop.is_set() and alive():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await runner.cleanup()
        await sink.stop()  # flushes what it holds, commits, closes
        await prices.stop()
        store.close()
        log.info("history writer stopped: %d rows written", sink.rows_written)


async def _dead_lettered_by_the_worker(*_: Any) -> None:
    """The worker's own price feed dead-letters a bad card; this copy only skips it."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


_SQL_BODY = 'body must be JSON {"query": "<one read-only statement>"}'
_UNAUTHORIZED = (
    "the history writer answers its workers only (Authorization: Bearer <token>): send your requests "
    "to a worker's port; a meter worker takes the token from SPENDSTREAM_HISTORY_TOKEN, else from "
    "<state_dir>/history.token on the writer's host"
)
_REPRICE_BODY = 'body must be JSON {"from_us": <int>, "to_us": <int>, "model": "<id>" or null}'


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _web(
    store: ClickHouseStore, sink: Sink, prices: PriceFeed, token: str, max_queries: int
) -> web.Application:
    # Users' queries get threads of their own: the default executor's few threads stay for the
    # sink's inserts, whatever the users run.
    queries = ThreadPoolExecutor(max_workers=max_queries, thread_name_prefix="spendstream-user-sql")
    running = 0

    expected = f"Bearer {token}".encode()

    @web.middleware
    async def only_with_the_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if request.path != "/health" and not hmac.compare_digest(given, expected):
            return web.json_response({"error": _UNAUTHORIZED}, status=401)
        return await handler(request)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"pid": os.getpid(), "sink_rows_written": sink.rows_written})

    async def sql(request: web.Request) -> web.Response:
        nonlocal running
        body = await _json_object(request)
        if body is None or not isinstance(body.get("query"), str):
            return web.json_response({"error": _SQL_BODY}, status=400)
        if running >= max_queries:
            busy = (
                f"{running} queries are running, the most at once (SPENDSTREAM_QUERY_MAX_CONCURRENT); "
                "try again when one has finished"
            )
            return web.json_response({"error": busy}, status=429)
        running += 1
        try:  # a thread and a guarded session of its own: the sink's inserts go on meanwhile
            result = await asyncio.get_running_loop().run_in_executor(
                queries, store.user_query, body["query"]
            )
        except QueryError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        finally:
            running -= 1
        return web.json_response({"columns": result.columns, "rows": _jsonable(result.rows)})

    async def reprice_(request: web.Request) -> web.Response:
        body = await _json_object(request) or {}
        try:
            start, end = int(body["from_us"]), int(body["to_us"])
        except (TypeError, KeyError, ValueError):
            return web.json_response({"error": _REPRICE_BODY}, status=400)
        model = body.get("model") or None
        if model is not None and not isinstance(model, str):
            return web.json_response({"error": _REPRICE_BODY}, status=400)
        await prices.caught_up.wait()  # price with the cards published at run time too
        report = await asyncio.to_thread(reprice, store, prices.catalogue, start, end, model)
        return web.json_response(
            {"pricing_version": report.pricing_version, "events": report.events, "rows": report.rows()}
        )

    async def flush(_: web.Request) -> web.Response:
        await sink.flush()
        return web.json_response({"sink_rows_written": sink.rows_written})

    app = web.Application(client_max_size=16 << 20, middlewares=[only_with_the_token])
    app.router.add_get("/health", health)
    app.router.add_post("/sql", sql)
    app.router.add_post("/reprice", reprice_)
    app.router.add_post("/flush", flush)
    return app
