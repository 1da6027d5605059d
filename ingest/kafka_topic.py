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
v10 itself with aiokafka's protocol types. A broker older than 2.8 (or an aiokafka whose
protocol classes moved) gets the epoch without the id, with a warning: still right except
across a recreation of the topic.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from io import BytesIO
from typing import Any

__all__ = ["partition_epoch", "topic_id"]

log = logging.getLogger("chorus.kafka")

UNKNOWN_TOPIC_OR_PARTITION = 3  # Kafka error code: the topic (or its metadata) is not there yet
LEADER_NOT_AVAILABLE = 5


def partition_epoch(topic: str, partition: int, topic_id_: str) -> str:
    """The epoch of a partition's offset space (see the module docstring)."""
    return f"{topic}:{partition}:{topic_id_}" if topic_id_ else f"{topic}:{partition}"


def _metadata_v10() -> Any:
    """The Metadata v10 request builder (built lazily: aiokafka is imported only here)."""
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
        API_KEY = 3
        API_VERSION = 10
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
        API_KEY = 3
        API_VERSION = 10
        RESPONSE_TYPE = MetadataResponseV10
        SCHEMA = Schema(
            ("topics", CompactArray(("topic_id", Uuid), ("name", text), ("tags", TaggedFields))),
            ("allow_auto_topic_creation", Boolean),
            ("include_cluster_authorized_operations", Boolean),
            ("include_topic_authorized_operations", Boolean),
            ("tags", TaggedFields),
        )

    class TopicMetadataRequest(Request[MetadataRequestV10]):  # type: ignore[misc]
        API_KEY = 3

        def __init__(self, topic: str) -> None:
            self.topic = topic

        def build(self, request_struct_class: type[MetadataRequestV10]) -> MetadataRequestV10:
            return request_struct_class([(bytes(16), self.topic, {})], False, False, False, {})

    return TopicMetadataRequest


async def _ask(client: Any, topic: str) -> tuple[int, bytes]:
    """(Kafka error code, raw 16-byte topic id) from one broker."""
    node = client.get_random_node()
    response = await client.send(node, _metadata_v10()(topic))
    for error_code, name, raw_id, *_rest in response.topics:
        if name == topic:
            return int(error_code), bytes(raw_id)
    return UNKNOWN_TOPIC_OR_PARTITION, bytes(16)


async def topic_id(bootstrap: str, topic: str, timeout_s: float = 30.0) -> str:
    """The topic's id as Kafka prints it; "" if this broker or client cannot tell.

    Retries while the topic's metadata is not there yet; raises TimeoutError after
    ``timeout_s`` (the consumer could not have consumed it either).
    """
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="chorus-topic-id")
    try:
        async with asyncio.timeout(timeout_s):
            await client.bootstrap()
            while True:
                try:
                    error_code, raw = await _ask(client, topic)
                except (NotImplementedError, ImportError, TypeError, AttributeError) as exc:
                    log.warning("cannot read the id of topic %s (%s: %s); epochs will not tell a recreated "
                                "topic from the old one", topic, type(exc).__name__, exc)
                    return ""
                if error_code == 0 and any(raw):
                    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
                if error_code not in (UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE):
                    raise RuntimeError(f"kafka refused metadata of topic {topic} (error code {error_code})")
                await asyncio.sleep(0.2)
    finally:
        await client.close()
