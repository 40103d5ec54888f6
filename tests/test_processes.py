"""Service processes: health turns SERVING when ready, SIGTERM stops them cleanly."""

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tunewire.clients.local_stack import LocalStack

from conftest import free_port


def test_dataset_process_serves_then_stops_cleanly_on_sigterm(tmp_path):
    stack = LocalStack(
        env={"TUNEWIRE_HOME": str(tmp_path), "TUNEWIRE_DATASET_PORT": str(free_port())}, services=("dataset",), log_dir=tmp_path / "logs"
    )
    with stack:
        with grpc.insecure_channel(stack.address("dataset")) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tunewire.v1.DatasetService"), timeout=5
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert stack.processes["dataset"].returncode == 0
    assert "stopping (grace" in (tmp_path / "logs" / "dataset.log").read_text()


def test_a_bad_setting_stops_the_service_naming_the_variable(tmp_path):
    stack = LocalStack(
        env={"TUNEWIRE_HOME": str(tmp_path), "TUNEWIRE_DATASET_PORT": "not-a-port"}, services=("dataset",), log_dir=tmp_path / "logs"
    )
    with pytest.raises(RuntimeError, match="exited"):
        with stack:
            pass
    log = (tmp_path / "logs" / "dataset.log").read_text()
    assert "TUNEWIRE_DATASET_PORT='not-a-port'" in log and "Traceback" not in log


def test_a_service_whose_port_is_taken_exits_saying_which_setting_to_change(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        stack = LocalStack(
            env={"TUNEWIRE_HOME": str(tmp_path), "TUNEWIRE_DATASET_PORT": str(port)}, services=("dataset",), log_dir=tmp_path / "logs"
        )
        with pytest.raises(RuntimeError) as failure:
            with stack:
                pass
    # The start-up error carries the log's last lines: the reason, not only a code.
    assert "exited with code 1" in str(failure.value)
    assert f"cannot listen on 127.0.0.1:{port}" in str(failure.value) and "set TUNEWIRE_DATASET_PORT" in str(failure.value)
    assert "Traceback" not in (tmp_path / "logs" / "dataset.log").read_text()
