"""What services call: emitters that publish usage events to Kafka, and guards that obey the
kill switch on `spend.control`; and every error they raise (the tree is in spendstream/errors.py).

    from producers import BudgetExceeded, Emitter, Guard, SyncEmitter, SyncGuard
"""

from producers._emitter import Emitter, EmitterStats, SyncEmitter, build_event
from producers._guard import Guard, ScopeState, SyncGuard
from producers._meter_call import meter_call, metered
from spendstream.errors import (
    BudgetExceeded,
    BufferFull,
    ConfigError,
    DecodeError,
    DeliveryTimeout,
    EmitterClosed,
    IncompleteUsage,
    InvalidUsage,
    KafkaLocalError,
    QueryError,
    SpendstreamError,
    UnknownModel,
)
from spendstream.kafka_auth import KafkaAuth

__all__ = [
    "BudgetExceeded",
    "BufferFull",
    "ConfigError",
    "DecodeError",
    "DeliveryTimeout",
    "Emitter",
    "EmitterClosed",
    "EmitterStats",
    "Guard",
    "IncompleteUsage",
    "InvalidUsage",
    "KafkaAuth",
    "KafkaLocalError",
    "QueryError",
    "ScopeState",
    "SpendstreamError",
    "SyncEmitter",
    "SyncGuard",
    "UnknownModel",
    "build_event",
    "meter_call",
    "metered",
]
