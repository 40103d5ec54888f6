"""Domain errors. Domain code raises these; services/common/grpc_server.py maps
each to its gRPC status code in one place, so domain code never imports grpc."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class TunewireError(Exception):
    """Base of the errors a caller can act on."""


class InvalidArgument(TunewireError):
    """The request itself is wrong; `violations` say which field and why."""

    def __init__(self, message: str, violations: list[FieldViolation] | tuple = ()):
        super().__init__(message)
        self.violations = list(violations)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFound(TunewireError):
    pass


class FailedPrecondition(TunewireError):
    pass


class ResourceExhausted(TunewireError):
    pass


class Unavailable(TunewireError):
    """A dependency (another service, Ray) cannot be reached right now."""


class Unauthenticated(TunewireError):
    """No credentials, or ones no key matches."""


class PermissionDenied(TunewireError):
    """The caller is known but may not do this."""
