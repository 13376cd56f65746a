"""What services call: emitters that publish usage events to Kafka, and guards that obey the
kill switch on `spend.control`.

    from producers import Emitter, Guard, SyncEmitter, SyncGuard
"""

from producers._emitter import Emitter, EmitterStats, SyncEmitter, build_event
from producers._guard import Guard, ScopeState, SyncGuard
from producers._meter_call import meter_call, metered
from spendstream.kafka_auth import KafkaAuth

__all__ = [
    "Emitter",
    "EmitterStats",
    "Guard",
    "KafkaAuth",
    "ScopeState",
    "SyncEmitter",
    "SyncGuard",
    "build_event",
    "meter_call",
    "metered",
]
