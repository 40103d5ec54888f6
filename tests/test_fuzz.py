"""Every RPC of every service gets random requests (hypothesis builds them
from the protos' descriptors, plus raw bytes that are no valid message). No
answer may be INTERNAL or UNKNOWN, and the services keep serving."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunewire.v1 import dataset_pb2, inference_pb2, training_pb2

from conftest import three_services

SERVICES = {
    "dataset": dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"],
    "training": training_pb2.DESCRIPTOR.services_by_name["TrainingService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
}
METHODS = [(service, method) for service, descriptor in SERVICES.items() for method in descriptor.methods]
# Streams that follow live state end at the call's deadline: that is their normal end here.
ALLOWED = {code for code in grpc.StatusCode} - {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ_DEADLINE = 3.0
# A watch stream sends the current state at once, then waits for changes: a
# second shows how it answers; the rest is waiting.
WATCH_DEADLINE = 1.0

_SCALARS = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    # Short text, with the characters that matter in ids and paths, and text
    # wider than any column.
    FieldDescriptor.TYPE_STRING: st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            ["", "..", "../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "http://example.com/x", "ds-1", "default"]
            + ["/etc/passwd::memory://", "simplecache::file:///etc/passwd", "own/*", "LTE=", "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"]
        ),
        st.text(min_size=300, max_size=1200),
    ),
    # Bytes, and file contents built to hurt a parser.
    FieldDescriptor.TYPE_BYTES: st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", b'{"prompt": ' + b"9" * 5000 + b"}\n", b'a,b\n"x,y\n']),
    ),
}


def _value(field: FieldDescriptor, depth: int):
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers arrive too.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 1000))
    return _SCALARS[field.type]


@st.composite
def _message(draw, descriptor, depth: int):
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if depth > 3 or not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(_value(key_field, depth), _value(value_field, depth), max_size=3))
            for key, value in entries.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(message, field.name)[key].CopyFrom(value)
                else:
                    getattr(message, field.name)[key] = value
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(_value(field, depth), max_size=3)))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(message, field.name, draw(_value(field, depth)))
    return message


def messages(descriptor, depth: int = 0):
    return _message(descriptor, depth)


def request_bytes(method):
    """A serialized random request, or bytes that may not parse at all."""
    return st.one_of(messages(method.input_type).map(lambda m: m.SerializeToString()), st.binary(max_size=64))


@pytest.fixture(scope="module")
def channels(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "own").mkdir()
    with three_services(tmp, tiny_model_dir) as servers:
        opened = {name: grpc.insecure_channel(servers[name].address) for name in SERVICES}
        yield opened
        for channel in opened.values():
            channel.close()


def _call(channel: grpc.Channel, service: str, method, payloads: list[bytes]) -> grpc.StatusCode:
    path = f"/{SERVICES[service].full_name}/{method.name}"
    identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        if method.client_streaming:
            if method.server_streaming:
                raise AssertionError("no bidirectional RPCs in tunewire")
            channel.stream_unary(path, **identity)(iter(payloads), timeout=FUZZ_DEADLINE)
        elif method.server_streaming:
            deadline = WATCH_DEADLINE if method.name.startswith("Watch") else FUZZ_DEADLINE
            for _ in channel.unary_stream(path, **identity)(payloads[0], timeout=deadline):
                pass
        else:
            channel.unary_unary(path, **identity)(payloads[0], timeout=FUZZ_DEADLINE)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_random_requests_get_no_internal_error(channels, service, method):
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(request_bytes(method), min_size=1, max_size=4))
    def check(payloads):
        code = _call(channels[service], service, method, payloads)
        assert code in ALLOWED, f"{method.full_name} answered {code.name}"

    check()
    # Still serving after all of it.
    status = health_pb2_grpc.HealthStub(channels[service]).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
