"""Who is calling: API keys, projects (tenants) and roles.

Every dataset, job and adapter belongs to one project. A key belongs to one
project and has a role: `member` works inside its project; `admin` is its
project's admin, and may also load, unload and delete the project's adapters;
`operator` runs tunewire for every project: it acts for any project (the
`x-tunewire-project` metadata, which is how the services call each other on
a caller's behalf), follows every project's published adapters, sees every
project's loaded adapters, and holds datasets' pins. The services' own key
is an operator's, and is best limited to the RPCs that service calls
(`rpcs`, see SERVICE_RPCS): a stolen orchestrator key then pins datasets but
deletes none.

Keys are `tw_<id>_<secret>` with 32 random bytes of secret. The keys file
holds only their SHA-256: a key that random cannot be guessed from its hash,
so a slow password hash would only slow every call. Operators create and
revoke keys with `tunewire keys create|revoke`, which rewrite the file
(TUNEWIRE_API_KEYS_FILE); the services re-read it when it changes, so keys
are added and revoked without a restart.

No grpc here: the server's interceptor authenticates and sets the caller for
the handler (`caller()`), and servicers pass the caller's project on.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from tunewire.services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

OPERATOR, ADMIN, MEMBER = "operator", "admin", "member"
ROLES = (OPERATOR, ADMIN, MEMBER)
DEFAULT_PROJECT = "default"
PROJECT_HEADER = "x-tunewire-project"
KEY_PATTERN = re.compile(r"^tw_([0-9a-f]{8})_[A-Za-z0-9_-]{20,}$")
PROJECT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RPC_PATTERN = re.compile(r"^[A-Za-z0-9_.]+/[A-Za-z0-9_]+$")
# What each service calls on the others: its key needs these RPCs only.
SERVICE_RPCS = {
    "orchestrator": (
        "tunewire.v1.DatasetService/GetDataset",
        "tunewire.v1.DatasetService/PinDataset",
        "tunewire.v1.DatasetService/UnpinDataset",
    ),
    "inference": ("tunewire.v1.TrainingService/WatchAdapters",),
}


@dataclass(frozen=True)
class Caller:
    project: str
    role: str
    key_id: str
    # The RPCs the key may call ("package.Service/Method"); empty: every one its role may.
    rpcs: tuple[str, ...] = ()

    def require_rpc(self, method: str) -> None:
        """`method` as gRPC names it: "/package.Service/Method"."""
        if self.rpcs and method.lstrip("/") not in self.rpcs:
            raise PermissionDenied(f"this key ({self.key_id}) may call only {', '.join(self.rpcs)}; not {method.lstrip('/')}")

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR

    @property
    def is_admin(self) -> bool:
        """An admin of its project (an operator is one of every project)."""
        return self.role in (ADMIN, OPERATOR)

    def require_admin(self, action: str) -> None:
        if not self.is_admin:
            raise PermissionDenied(f"{action} needs an admin key; this key ({self.key_id}) is a {self.role} of project {self.project}")

    def require_operator(self, action: str) -> None:
        if not self.is_operator:
            raise PermissionDenied(
                f"{action} needs an operator key (every project's); this key ({self.key_id}) is a {self.role} of project {self.project}"
            )

    def acting_for(self, project: str) -> Caller:
        """The caller acting for `project` (operators only; '' keeps its own)."""
        if not project or project == self.project:
            return self
        self.require_operator(f"acting for project {project!r}")
        check_project(project, PROJECT_HEADER)
        return Caller(project, self.role, self.key_id, self.rpcs)


# With authentication off (loopback only), every caller is this one.
LOCAL_OPERATOR = Caller(DEFAULT_PROJECT, OPERATOR, "local")

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("tunewire_caller", default=LOCAL_OPERATOR)


def caller() -> Caller:
    """The caller of the RPC being handled."""
    return _caller.get()


def set_caller(who: Caller) -> contextvars.Token:
    return _caller.set(who)


def identify(keys: KeyRing | None, headers: dict[str, str]) -> Caller:
    """The caller a request's headers (gRPC metadata or HTTP headers, with
    lower-case names) authenticate: its key from `authorization: Bearer` or
    `x-api-key`, acting for the project `x-tunewire-project` names (operators
    only). Without keys (loopback only) every caller is the local operator."""
    if keys is None:
        return LOCAL_OPERATOR.acting_for(headers.get(PROJECT_HEADER, ""))
    key = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("x-api-key", "")
    if not key:
        raise Unauthenticated("no credentials: send an API key as 'authorization: Bearer <key>' (the CLI and SDK send TUNEWIRE_API_KEY)")
    who = keys.authenticate(key)
    if who is None:
        raise Unauthenticated("API key not recognised (unknown or revoked): ask an admin for a key of your project")
    return who.acting_for(headers.get(PROJECT_HEADER, ""))


def check_project(project: str, field: str = "project") -> str:
    if not PROJECT_PATTERN.match(project):
        raise InvalidArgument.field(field, f"{project!r} is not a project name: lowercase letters, digits and '-', at most 63")
    return project


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(project: str, role: str, rpcs: tuple[str, ...] = ()) -> tuple[str, dict]:
    """A fresh key and the keys-file entry that admits it (the key itself is
    shown once and stored nowhere); with `rpcs`, it may call only those."""
    check_project(project)
    if role not in ROLES:
        raise InvalidArgument.field("role", f"{role!r}: use one of {ROLES}")
    if bad := [rpc for rpc in rpcs if not RPC_PATTERN.match(rpc)]:
        raise InvalidArgument.field("rpcs", f"{bad[0]!r} is not an RPC name: package.Service/Method, e.g. {SERVICE_RPCS['inference'][0]}")
    key = f"tw_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    key_id = KEY_PATTERN.match(key).group(1)
    entry = {"id": key_id, "project": project, "role": role, "sha256": hash_key(key)}
    return key, entry | ({"rpcs": list(rpcs)} if rpcs else {})


class KeyRing:
    """The keys file, re-read when its modification time changes:
    {"keys": [{"id", "project", "role", "sha256", optional "rpcs"}, ...]}."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._entries: dict[str, dict] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            raise ValueError(f"API keys file {self.path} does not exist: create keys with `tunewire keys create`") from None
        # A replaced file (new inode) or a rewritten one (time, size) is read again.
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        if stamp == self._stamp:
            return
        entries = {}
        try:
            for i, entry in enumerate(json.loads(self.path.read_text())["keys"]):
                rpcs = entry.get("rpcs", [])
                if (
                    entry["role"] not in ROLES
                    or not PROJECT_PATTERN.match(entry["project"])
                    or len(entry["sha256"]) != 64
                    or not isinstance(rpcs, list)
                    or not all(isinstance(r, str) and RPC_PATTERN.match(r) for r in rpcs)
                ):
                    raise ValueError(
                        f"entry {i}: role must be one of {ROLES}, project a project name, sha256 a hex digest, "
                        "rpcs (if present) a list of package.Service/Method names"
                    )
                entries[entry["id"]] = entry
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"API keys file {self.path}: {exc}: expected {{'keys': [{{id, project, role, sha256}}]}}") from None
        self._entries, self._stamp = entries, stamp

    def authenticate(self, key: str) -> Caller | None:
        """The key's caller, or None for an unknown, revoked or malformed key."""
        match = KEY_PATTERN.match(key)
        if match is None:
            return None
        with self._lock:
            try:
                self._reload()
            except ValueError:
                pass  # a half-written file: keep the keys last read
            entry = self._entries.get(match.group(1))
        if entry is None or not hmac.compare_digest(entry["sha256"], hash_key(key)):
            return None
        return Caller(entry["project"], entry["role"], entry["id"], tuple(entry.get("rpcs", ())))
