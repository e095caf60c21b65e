"""TaskIt 4.0 compatibility: the constants and codecs the original kept in ``common``."""

from __future__ import annotations

from taskit.codecs import JSONCodec, MsgpackCodec, PickleCodec
from taskit.protocol import DEFAULT_PORT, KILL, STATS, STATUS, STOP, TASKS

__all__ = [
    "DEFAULT_PORT",
    "STOP",
    "KILL",
    "STATUS",
    "STATS",
    "TASKS",
    "JSONCodec",
    "MsgpackCodec",
    "PickleCodec",
]
