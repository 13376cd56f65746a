"""What services call: emitters that publish usage events to Kafka.

from producers import Emitter, SyncEmitter
"""

from producers._emitter import Emitter, SyncEmitter, build_event

__all__ = ["Emitter", "SyncEmitter", "build_event"]
