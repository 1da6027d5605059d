"""A Kafka topic's id (KIP-516): what tells a recreated topic from the one it replaced.

A comment's epoch names the offset space its offset belongs to. For Kafka that is one
partition of one *incarnation* of the topic: deleting and recreating ``comments`` starts
every partition at offset 0 again, under the same name. Kafka gives each incarnation a random
topic id (KIP-516, Kafka 2.8+) for exactly this reason, so the epoch is
``<topic>:<partition>:<topic id>``, with the id printed as Kafka prints it (URL-safe base64
without padding, as in ``kafka-topics.sh --describe``). Every consumer asks the cluster and
gets the same answer, so the coordinator and the archiver agree without talking to each
other.

aiokafka speaks Metadata only up to v5 and topic ids arrived in v10, so this module declares
v10 itself with aiokafka's protocol classes: a private API. :func:`check_aiokafka_protocol`
checks their shape (the signatures used, and the bytes a request encodes to and a response
decodes from, against the Kafka protocol's own layout) before the first use, and raises
:class:`~chorus.errors.PrivateApiChanged` naming the aiokafka version if they moved.

There is no epoch without the id: a role that cannot read it does not start
(:class:`TopicIdUnreadable`, naming the broker and the topic). Roles of mixed versions, or a
broker older than 2.8, would otherwise name the same offset space differently, and every
resume across them would answer ``recovered: false``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import logging
from io import BytesIO
from typing import Any

from chorus.errors import ChorusError, PrivateApiChanged, Unavailable

__all__ = ["TopicIdUnavailable", "TopicIdUnreadable", "check_aiokafka_protocol", "partition_epoch", "topic_id"]

log = logging.getLogger("chorus.kafka")

UNKNOWN_TOPIC_OR_PARTITION = 3  # Kafka error code: the topic (or its metadata) is not there yet
LEADER_NOT_AVAILABLE = 5
METADATA_API_KEY = 3
METADATA_VERSION = 10  # the first Metadata version with topic ids (KIP-516)
NO_TOPIC_ID = bytes(16)  # Kafka's "no id" (Uuid.ZERO_UUID)


class TopicIdUnreadable(ChorusError):
    """The broker does not tell the topic's id (older than Kafka 2.8, or it refused the request):
    the role does not start."""


class TopicIdUnavailable(Unavailable, TimeoutError):
    """The topic's metadata did not come within the time allowed (the broker is down, or the
    topic does not exist yet); a TimeoutError too, for callers that wait on it."""


def partition_epoch(topic: str, partition: int, topic_id_: str) -> str:
    """The epoch of a partition's offset space (see the module docstring)."""
    return f"{topic}:{partition}:{topic_id_}" if topic_id_ else f"{topic}:{partition}"


def _aiokafka_version() -> str:
    try:
        import aiokafka
    except ImportError as exc:
        return f"not importable: {exc}"
    return str(getattr(aiokafka, "__version__", "unknown"))


def _changed(what: str) -> PrivateApiChanged:
    return PrivateApiChanged(
        f"aiokafka {_aiokafka_version()}: {what}. chorus.ingest.kafka_topic declares Metadata v{METADATA_VERSION} "
        "(topic ids) with aiokafka's protocol classes as aiokafka 0.14 has them; install the aiokafka version "
        "pyproject.toml pins, or update ingest/kafka_topic.py")


def _metadata_request(version: int) -> Any:
    """The Metadata request builder whose struct says ``version``, built from aiokafka's protocol
    classes (imported only here). Raises :class:`PrivateApiChanged` if they are not there."""
    try:
        return _build_metadata_request(version)
    except (ImportError, AttributeError, TypeError) as exc:
        raise _changed(f"its protocol classes cannot declare a request ({type(exc).__name__}: {exc})") from None


@functools.cache
def _build_metadata_request(version: int) -> Any:
    from aiokafka.protocol.abstract import AbstractType
    from aiokafka.protocol.api import Request, RequestStruct, Response
    from aiokafka.protocol.types import (
        Boolean,
        CompactArray,
        CompactString,
        Int16,
        Int32,
        Schema,
        TaggedFields,
    )

    class Uuid(AbstractType[bytes]):  # type: ignore[misc]
        @classmethod
        def encode(cls, value: bytes) -> bytes:
            return value

        @classmethod
        def decode(cls, data: BytesIO) -> bytes:
            return data.read(16)

    text = CompactString("utf-8")

    class MetadataResponseV10(Response):  # type: ignore[misc]
        API_KEY = METADATA_API_KEY
        API_VERSION = version
        SCHEMA = Schema(
            ("throttle_time_ms", Int32),
            ("brokers", CompactArray(("node_id", Int32), ("host", text), ("port", Int32), ("rack", text),
                                     ("tags", TaggedFields))),
            ("cluster_id", text),
            ("controller_id", Int32),
            ("topics", CompactArray(
                ("error_code", Int16), ("name", text), ("topic_id", Uuid), ("is_internal", Boolean),
                ("partitions", CompactArray(
                    ("error_code", Int16), ("partition_index", Int32), ("leader_id", Int32),
                    ("leader_epoch", Int32), ("replica_nodes", CompactArray(Int32)),
                    ("isr_nodes", CompactArray(Int32)), ("offline_replicas", CompactArray(Int32)),
                    ("tags", TaggedFields))),
                ("topic_authorized_operations", Int32), ("tags", TaggedFields))),
            ("cluster_authorized_operations", Int32),
            ("tags", TaggedFields),
        )

    class MetadataRequestV10(RequestStruct):  # type: ignore[misc]
        FLEXIBLE_VERSION = True
        API_KEY = METADATA_API_KEY
        API_VERSION = version
        RESPONSE_TYPE = MetadataResponseV10
        SCHEMA = Schema(
            ("topics", CompactArray(("topic_id", Uuid), ("name", text), ("tags", TaggedFields))),
            ("allow_auto_topic_creation", Boolean),
            ("include_cluster_authorized_operations", Boolean),
            ("include_topic_authorized_operations", Boolean),
            ("tags", TaggedFields),
        )

    class TopicMetadataRequest(Request[MetadataRequestV10]):  # type: ignore[misc]
        API_KEY = METADATA_API_KEY

        def __init__(self, topic: str) -> None:
            self.topic = topic

        def build(self, request_struct_class: type[MetadataRequestV10]) -> MetadataRequestV10:
            return request_struct_class([(NO_TOPIC_ID, self.topic, {})], False, False, False, {})

    return TopicMetadataRequest


# Metadata v10 on the wire (the Kafka protocol guide; compact arrays and strings carry length + 1
# as an unsigned varint, an empty tag buffer is one 0 byte).
_REQUEST_V10_COMMENTS = (b"\x02" + NO_TOPIC_ID + b"\x09comments" + b"\x00"  # topics: [(no id, "comments")]
                         + b"\x00\x00\x00" + b"\x00")  # three booleans false, no tags
_TOPIC_ID = bytes(range(1, 17))
_RESPONSE_V10 = (
    b"\x00\x00\x00\x00"  # throttle_time_ms
    + b"\x02" + b"\x00\x00\x00\x01" + b"\x02k" + b"\x00\x00\x23\x84" + b"\x00" + b"\x00"  # broker 1 k:9092, no rack
    + b"\x02c" + b"\x00\x00\x00\x01"  # cluster_id "c", controller 1
    + b"\x02" + b"\x00\x00" + b"\x09comments" + _TOPIC_ID + b"\x00"  # one topic: no error, name, id, not internal
    + b"\x01"  # no partitions
    + b"\x00\x00\x00\x00" + b"\x00"  # topic_authorized_operations, tags
    + b"\x00\x00\x00\x00" + b"\x00"  # cluster_authorized_operations, tags
)


@functools.cache
def check_aiokafka_protocol() -> None:
    """Raise :class:`PrivateApiChanged` unless aiokafka's internals have the shape this module uses:
    the client's and the request builder's signatures, and Metadata v10's bytes both ways."""
    from aiokafka.client import AIOKafkaClient

    _check_parameters(AIOKafkaClient.send, ("self", "node_id", "request"), "AIOKafkaClient.send")
    for name in ("bootstrap", "get_random_node", "close"):
        if not callable(getattr(AIOKafkaClient, name, None)):
            raise _changed(f"AIOKafkaClient has no method {name}()")
    builder = _metadata_request(METADATA_VERSION)
    _check_parameters(builder.prepare, ("self", "versions"), "Request.prepare")
    try:
        struct = builder("comments").prepare({METADATA_API_KEY: (0, METADATA_VERSION)})
        encoded = struct.encode()
        response = struct.RESPONSE_TYPE.decode(BytesIO(_RESPONSE_V10))
        topics = [(int(t[0]), t[1], bytes(t[2])) for t in response.topics]
    except Exception as exc:  # any failure here is the shape, not the network: there is none
        raise _changed(f"a Metadata v{METADATA_VERSION} request cannot be built or read ({type(exc).__name__}: {exc})"
                       ) from None
    if encoded != _REQUEST_V10_COMMENTS:
        raise _changed(f"Metadata v{METADATA_VERSION} for topic 'comments' encodes to {encoded.hex()}, "
                       f"not {_REQUEST_V10_COMMENTS.hex()}")
    if topics != [(0, "comments", _TOPIC_ID)]:
        raise _changed(f"a Metadata v{METADATA_VERSION} response decodes to topics {topics!r}")


def _check_parameters(function: Any, leading: tuple[str, ...], name: str) -> None:
    try:
        parameters = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError) as exc:
        raise _changed(f"{name} has no signature ({exc})") from None
    if parameters[: len(leading)] != leading:
        raise _changed(f"{name} takes ({', '.join(parameters)}), not ({', '.join(leading)}, ...)")


def _broker_name(client: Any, node: Any, bootstrap: str) -> str:
    """The broker asked, as host:port (node id), and the bootstrap list it came from."""
    meta = client.cluster.broker_metadata(node) if node is not None else None
    where = f"{meta.host}:{meta.port} (node {node})" if meta is not None else f"node {node}"
    return f"kafka broker {where} of bootstrap {bootstrap}"


async def _ask(client: Any, node: Any, topic: str) -> tuple[int, bytes]:
    """(Kafka error code, raw 16-byte topic id) from one broker."""
    response = await client.send(node, _metadata_request(METADATA_VERSION)(topic))
    for error_code, name, raw_id, *_rest in response.topics:
        if name == topic:
            return int(error_code), bytes(raw_id)
    return UNKNOWN_TOPIC_OR_PARTITION, NO_TOPIC_ID


async def _ask_broker(client: Any, bootstrap: str, topic: str) -> tuple[int, bytes]:
    """:func:`_ask` a random broker; a broker that cannot answer Metadata v10 is a
    :class:`TopicIdUnreadable` naming it."""
    from aiokafka.errors import IncompatibleBrokerVersion

    node = client.get_random_node()
    try:
        return await _ask(client, node, topic)
    except (NotImplementedError, IncompatibleBrokerVersion) as exc:  # Request.prepare: not in the broker's versions
        raise TopicIdUnreadable(
            f"{_broker_name(client, node, bootstrap)} does not answer Metadata v{METADATA_VERSION}, which tells "
            f"topic {topic}'s id ({exc}); Chorus needs Kafka 2.8 or later (KIP-516 topic ids) so that every "
            "role names the topic's offset spaces alike") from None


async def topic_id(bootstrap: str, topic: str, timeout_s: float = 30.0) -> str:
    """The topic's id as Kafka prints it.

    Retries while the topic's metadata is not there yet; raises :class:`TopicIdUnavailable` (a
    TimeoutError) after ``timeout_s`` (the consumer could not have consumed it either),
    :class:`TopicIdUnreadable` if the broker cannot tell the id, and
    :class:`~chorus.errors.PrivateApiChanged` if aiokafka's protocol classes changed shape.
    """
    from aiokafka.client import AIOKafkaClient

    check_aiokafka_protocol()
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="chorus-topic-id")
    last = "no answer"
    try:
        async with asyncio.timeout(timeout_s):
            await client.bootstrap()
            while True:
                error_code, raw = await _ask_broker(client, bootstrap, topic)
                if error_code == 0 and raw != NO_TOPIC_ID:
                    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
                if error_code == 0:
                    raise TopicIdUnreadable(
                        f"kafka (bootstrap {bootstrap}) has topic {topic} without a topic id: a cluster whose "
                        "inter.broker.protocol.version is older than 2.8 assigns none; Chorus needs one (KIP-516) "
                        "so that every role names the topic's offset spaces alike")
                if error_code not in (UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE):
                    raise TopicIdUnreadable(f"kafka (bootstrap {bootstrap}) refused metadata of topic {topic} "
                                            f"(error code {error_code})")
                last = f"error code {error_code}"
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise TopicIdUnavailable(f"kafka (bootstrap {bootstrap}) did not tell topic {topic}'s id within "
                                 f"{timeout_s:g} s ({last}: is the broker up, and the topic created?)") from None
    finally:
        await client.close()
