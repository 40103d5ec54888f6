"""How one service calls another: the channel (TLS when configured) and the
metadata that carries the service's key and the project it acts for."""

from __future__ import annotations

import grpc

from tunewire.services.common.auth import PROJECT_HEADER
from tunewire.services.common.grpc_server import MAX_MESSAGE_BYTES
from tunewire.services.common.settings import Settings
from tunewire.services.common.telemetry import REQUEST_ID_HEADER, request_id


def open_channel(address: str, settings: Settings) -> grpc.aio.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if settings.tls_cert_file is None and settings.tls_ca_file is None:
        return grpc.aio.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None,
        # Under mutual TLS the service presents its own certificate as a client.
        private_key=settings.tls_key_file.read_bytes() if settings.tls_client_ca_file else None,
        certificate_chain=settings.tls_cert_file.read_bytes() if settings.tls_client_ca_file else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=options)


def call_metadata(settings: Settings, project: str = "") -> tuple[tuple[str, str], ...]:
    """The service's key, the project it acts for ('' for its own), and the
    id of the request being handled, so its logs and ours share it."""
    metadata: list[tuple[str, str]] = []
    if request_id():
        metadata.append((REQUEST_ID_HEADER, request_id()))
    key = settings.service_api_key.get_secret_value()
    if key:
        metadata.append(("authorization", f"Bearer {key}"))
    if project:
        metadata.append((PROJECT_HEADER, project))
    return tuple(metadata)
