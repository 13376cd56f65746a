"""The two ports the transports use: a budget guard and an emitter."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["EmitterLike", "GuardLike"]


@runtime_checkable
class GuardLike(Protocol):
    """A local budget check: `producers.Guard` / `producers.SyncGuard`, or any object like them.

    `check` is synchronous and does no network I/O: it reads state the guard keeps up to date in
    the background. It returns None when the call may proceed and raises
    `spendstream.errors.BudgetExceeded` (scope, reason, spend_usd, limit_usd, window_end) when any
    scope matching the arguments is blocked (`key`: a gateway key's public id, scope `key:<id>`).
    """

    def check(
        self,
        *,
        project: str,
        team: str | None = None,
        user: str | None = None,
        model: str | None = None,
        key: str | None = None,
    ) -> None: ...


class EmitterLike(Protocol):
    """`SyncEmitter` (its `emit`) or `Emitter` (its `emit_nowait`): validates, buffers, returns the id."""

    def emit(self, *, project: str, provider: str, model: str, **usage: Any) -> Any: ...
