"""Structured logs and the request id that follows a request across services."""

import io
import json
import logging

from tunewire.services.common import telemetry
from tunewire.services.common.channels import call_metadata
from tunewire.services.common.settings import load_settings


def test_logs_are_json_lines_with_the_request_id(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        telemetry.configure_logging("INFO", "json")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)
        telemetry.set_request_id("req-123")
        logging.getLogger("tunewire.test").info("stored dataset %s", "ds-1", extra={"rows": 4})
        record = json.loads(stream.getvalue())
        assert record["message"] == "stored dataset ds-1" and record["request_id"] == "req-123"
        assert record["level"] == "INFO" and record["logger"] == "tunewire.test" and record["rows"] == 4 and record["time"]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_calls_between_services_carry_the_request_id_and_the_service_key(tmp_path):
    settings = load_settings(home=tmp_path, service_api_key="tw_0123abcd_" + "k" * 43)
    telemetry.set_request_id("")  # a new id
    generated = telemetry.request_id()
    assert len(generated) == 32
    metadata = dict(call_metadata(settings, project="alpha"))
    assert metadata == {
        "authorization": "Bearer tw_0123abcd_" + "k" * 43,
        "x-tunewire-project": "alpha",
        "x-request-id": generated,
    }
