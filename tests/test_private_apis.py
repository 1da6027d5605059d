"""The private APIs Chorus uses are checked, and a change of their shape is a clear error at start.

- picows: gateway/handoff.py builds picows's ``WSProtocol`` (not public) by keyword; the
  gateway checks one at start (``check_picows_protocol``).
- aiokafka: ingest/kafka_topic.py declares Metadata v10 with aiokafka's protocol classes;
  ``check_aiokafka_protocol`` checks the signatures used and the bytes both ways against the
  Kafka protocol's layout. A topic id that cannot be read stops the role (no epoch without it).

The shape tests fail with the message a deployment would see if picows or aiokafka changed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import aiokafka
import picows
import pytest
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs

from chorus.errors import ChorusError, PrivateApiChanged, Unavailable
from chorus.gateway import handoff
from chorus.ingest import kafka_topic
from chorus.ingest.kafka_topic import TopicIdUnavailable, TopicIdUnreadable, check_aiokafka_protocol, topic_id
from chorus.ingest.log import KafkaLogConsumer

LOGGER = logging.getLogger("chorus.test.picows")


def _listener_factory(_request: Any) -> Any:
    return None


def _make_inner() -> Any:
    return handoff.new_picows_protocol(_listener_factory, LOGGER, handshake_timeout_s=5.0, max_frame_size=65536)


@pytest.fixture
def fresh_aiokafka_check() -> Iterator[None]:
    """check_aiokafka_protocol runs once per process; these tests run it again."""
    check_aiokafka_protocol.cache_clear()
    kafka_topic._build_metadata_request.cache_clear()
    yield
    check_aiokafka_protocol.cache_clear()
    kafka_topic._build_metadata_request.cache_clear()


# -- picows --

async def test_picows_builds_the_protocol_the_hand_off_uses() -> None:
    handoff.check_picows_protocol(_make_inner)  # raises PrivateApiChanged otherwise
    protocol = _make_inner()
    assert isinstance(protocol, WSProtocol)
    assert protocol.transport is None and protocol.listener is None  # picows's readonly fields: not connected yet
    assert handoff.picows_version().startswith("2.3."), "pyproject pins picows 2.3; the hand-off was written against it"


async def test_a_picows_constructor_of_another_shape_is_a_clear_start_up_error() -> None:
    def renamed_parameter() -> Any:  # what a picows that renamed ws_path would do with our keywords
        return WSProtocol(
            host_port=None, path=None, is_client_side=False, ws_listener_factory=_listener_factory, logger=LOGGER,
            disconnect_on_exception=True, websocket_handshake_timeout=5.0, enable_auto_ping=False,
            auto_ping_idle_timeout=20.0, auto_ping_reply_timeout=20.0,
            auto_ping_strategy=picows.WSAutoPingStrategy.PING_WHEN_IDLE, enable_auto_pong=True,
            max_frame_size=65536, extra_headers=None, read_buffer_init_size=2048)

    with pytest.raises(PrivateApiChanged) as caught:
        handoff.check_picows_protocol(renamed_parameter)
    text = str(caught.value)
    assert f"picows {handoff.picows_version()}" in text and "WSProtocol constructor" in text and "'path'" in text
    assert "gateway/handoff.py" in text and isinstance(caught.value, ChorusError)


async def test_a_picows_protocol_without_a_method_the_recorder_calls_is_named() -> None:
    class Shrunk:  # a picows protocol that stopped being an asyncio.BufferedProtocol
        def connection_made(self, transport: Any) -> None: ...

    with pytest.raises(PrivateApiChanged, match=r"has no connection_lost, get_buffer, buffer_updated, eof_received"):
        handoff.check_picows_protocol(Shrunk)


async def test_the_gateway_checks_picows_when_it_makes_its_protocol_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(**_kwargs: Any) -> Any:  # what picows 2.2's constructor said to keywords it did not know
        raise TypeError("__init__() got an unexpected keyword argument 'read_buffer_init_size'")

    factory = handoff.picows_protocol_factory(_listener_factory, {}, handshake_timeout_s=5.0, max_frame_size=65536,
                                              logger=LOGGER, http_handler=_no_http)
    assert isinstance(factory(), handoff.RecordingProtocol)
    monkeypatch.setattr(handoff, "WSProtocol", make)
    with pytest.raises(PrivateApiChanged, match="unexpected keyword argument 'read_buffer_init_size'"):
        handoff.picows_protocol_factory(_listener_factory, {}, handshake_timeout_s=5.0, max_frame_size=65536,
                                        logger=LOGGER, http_handler=_no_http)


async def _no_http(_request: Any, _ip: str) -> bytes:
    return b""


# -- aiokafka --

def test_aiokafka_protocol_classes_encode_and_decode_metadata_v10(fresh_aiokafka_check: None) -> None:
    check_aiokafka_protocol()  # raises PrivateApiChanged otherwise
    assert aiokafka.__version__.startswith("0.14."), "pyproject pins aiokafka 0.14; kafka_topic was written for it"


def test_an_aiokafka_client_of_another_shape_is_a_clear_error(fresh_aiokafka_check: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka.client import AIOKafkaClient

    async def send(self: Any, request: Any, node_id: int) -> Any: ...  # arguments swapped

    monkeypatch.setattr(AIOKafkaClient, "send", send)
    with pytest.raises(PrivateApiChanged) as caught:
        check_aiokafka_protocol()
    text = str(caught.value)
    assert f"aiokafka {aiokafka.__version__}" in text and "AIOKafkaClient.send takes (self, request, node_id)" in text


def test_aiokafka_types_that_encode_differently_are_a_clear_error(fresh_aiokafka_check: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka.protocol import types

    monkeypatch.setattr(types.TaggedFields, "encode", classmethod(lambda cls, value: b""))
    with pytest.raises(PrivateApiChanged, match=r"aiokafka .*Metadata v10 for topic 'comments' encodes to"):
        check_aiokafka_protocol()


def test_aiokafka_protocol_classes_that_moved_are_a_clear_error(fresh_aiokafka_check: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka.protocol import types

    monkeypatch.delattr(types, "CompactArray")
    with pytest.raises(PrivateApiChanged, match=r"its protocol classes cannot declare a request \(ImportError"):
        check_aiokafka_protocol()


# -- the topic id, from the real Kafka --

@pytest.mark.services
async def test_the_topic_id_of_the_real_broker(kafka_bootstrap: str) -> None:
    first = await topic_id(kafka_bootstrap, "comments", timeout_s=30)
    assert len(first) == 22 and first == await topic_id(kafka_bootstrap, "comments", timeout_s=30)


@pytest.mark.services
async def test_a_broker_without_the_request_is_a_start_up_error_naming_broker_and_topic(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_aiokafka_protocol()
    # A version the broker does not list in its ApiVersions answer: what a broker before 2.8 does to v10.
    monkeypatch.setattr(kafka_topic, "METADATA_VERSION", 99)
    with pytest.raises(TopicIdUnreadable) as caught:
        await topic_id(kafka_bootstrap, "comments", timeout_s=30)
    text = str(caught.value)
    host, _, port = kafka_bootstrap.split(",")[0].rpartition(":")
    assert f"kafka broker {host}:{port} (node " in text and f"bootstrap {kafka_bootstrap}" in text
    assert "topic comments's id" in text and "Kafka 2.8 or later" in text
    assert not isinstance(caught.value, Unavailable)  # not retried: the cluster must change

    consumer = KafkaLogConsumer(kafka_bootstrap, "comments", f"g-{uuid.uuid4().hex[:6]}")
    try:
        with pytest.raises(TopicIdUnreadable, match="topic comments's id"):
            await consumer.start()  # the coordinator's and archiver's consumer: no epoch without the id
    finally:
        await consumer.stop()


@pytest.mark.services
async def test_a_topic_whose_metadata_never_comes_is_unavailable_naming_it(kafka_bootstrap: str) -> None:
    topic = f"absent-{uuid.uuid4().hex[:8]}"  # Metadata v10 asks without creating it
    with pytest.raises(TopicIdUnavailable) as caught:
        await topic_id(kafka_bootstrap, topic, timeout_s=1.5)
    text = str(caught.value)
    assert f"bootstrap {kafka_bootstrap}" in text and f"topic {topic}'s id within 1.5 s" in text
    assert "error code 3" in text  # UNKNOWN_TOPIC_OR_PARTITION, Kafka's own answer
    assert isinstance(caught.value, Unavailable) and isinstance(caught.value, TimeoutError)
