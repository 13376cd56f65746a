"""The live kill switch: every scope's current state on `spend.control`, and each change as it
comes, for the pages' event stream (server-sent events).

Reads the topic the way `spendstream watch` does (`tail_control`: the compacted topic from the
start, then follow; with verify keys, only the signals a Guard would obey). A lost broker is
retried every few seconds; the pages keep the last state they had and say the feed is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from spendstream.cli.dashboard.pages import change_item, control_row
from spendstream.cli.watch import signal_json, tail_control
from spendstream.settings import Settings

__all__ = ["LiveControl"]

log = logging.getLogger(__name__)
_RETRY_SECONDS = 3.0


class LiveControl:
    """`current`: scope -> its latest signal (JSON form of `signal_json`, plus the rendered row);
    `recent`: the latest changes, newest first. Subscribers get every change after they subscribe."""

    def __init__(self, settings: Settings, keep: int = 50) -> None:
        self._settings = settings
        self.current: dict[str, dict[str, Any]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.error = ""
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    async def run(self) -> None:
        """Follow the topic until cancelled."""
        settings = self._settings
        while True:
            try:
                async for signal in tail_control(
                    settings.bootstrap,
                    settings.topics.spend_control,
                    True,
                    settings.verifier(),
                    settings.kafka_auth,
                ):
                    self.error = ""
                    self._publish(signal_json(signal))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker: keep serving the pages, retry
                self.error = f"spend.control unreachable at {settings.bootstrap}: {exc!r}"
                log.warning("%s; retrying in %.0f s", self.error, _RETRY_SECONDS)
                await asyncio.sleep(_RETRY_SECONDS)

    def _publish(self, item: dict[str, Any]) -> None:
        known = self.current.get(item["scope"])
        if known is not None and item["sequence"] <= known["sequence"]:
            return  # re-read after a reconnect (the topic from the start), or older than what is shown
        item["received_at"] = time.time()
        item["row_html"] = control_row(item)
        item["change_html"] = change_item(item)
        self.current[item["scope"]] = item
        self.recent.appendleft(item)
        for queue in self._subscribers:
            queue.put_nowait(item)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
