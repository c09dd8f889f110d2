"""broker: the MQTT contract shared by the edge agent and the aggregator.

Pure modules (stdlib, msgpack, pydantic only): ``topics``, ``messages``, ``codec``,
``chunking``, ``inbox``, ``backoff``, ``errors``, ``settings``, ``transport`` (the
``Transport`` protocol), ``memory`` (an in-process fake broker implementing it). ``broker.mqtt``
is the project's only paho-mqtt importer and is NOT imported here: ``import broker`` never pulls
in paho. ``broker.local`` starts a private Mosquitto (tests, simulations).
"""

from broker.chunking import (
    Chunk,
    Download,
    Reassembler,
    Split,
    TransferLimits,
    TransferSpec,
    chunks_for_fetch,
    chunks_missing,
    global_manifest,
    plan_messages,
    split,
    upload_messages,
)
from broker.codec import decode, encode
from broker.errors import TransportError, WireError
from broker.inbox import ChunkResult, CompletedUpload, Inbox, InboxLimits, UploadKey
from broker.memory import MemoryBroker, MemoryClient
from broker.messages import (
    PROTOCOL_VERSION,
    AckStatus,
    ClientState,
    ClientStatus,
    DownlinkPlan,
    DownlinkRoute,
    FetchRequest,
    GlobalChunk,
    GlobalManifest,
    RoundAnnouncement,
    RoundPhase,
    RoundProgress,
    UploadAck,
    UploadChunk,
    UploadManifest,
    WireMessage,
)
from broker.settings import MqttSettings, TlsSettings
from broker.transport import Message, PublishHandle, Transport, Will

__all__ = [
    "PROTOCOL_VERSION",
    "AckStatus",
    "Chunk",
    "ChunkResult",
    "ClientState",
    "ClientStatus",
    "CompletedUpload",
    "DownlinkPlan",
    "DownlinkRoute",
    "Download",
    "FetchRequest",
    "GlobalChunk",
    "GlobalManifest",
    "Inbox",
    "InboxLimits",
    "MemoryBroker",
    "MemoryClient",
    "Message",
    "MqttSettings",
    "PublishHandle",
    "Reassembler",
    "RoundAnnouncement",
    "RoundPhase",
    "RoundProgress",
    "Split",
    "TlsSettings",
    "TransferLimits",
    "TransferSpec",
    "Transport",
    "TransportError",
    "UploadAck",
    "UploadChunk",
    "UploadKey",
    "UploadManifest",
    "Will",
    "WireError",
    "WireMessage",
    "chunks_for_fetch",
    "chunks_missing",
    "decode",
    "encode",
    "global_manifest",
    "plan_messages",
    "split",
    "upload_messages",
]
