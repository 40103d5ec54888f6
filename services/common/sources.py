"""Which paths and URLs a request may make a service read.

A source is one storage location: a local path, or a URL of one object
store (`s3://bucket/key`, `gs://…`, `az://…`). fsspec reads more into a
string than that (`A::B` chains filesystems, `zip://`, `http://`,
`simplecache::`, globs), so a source is parsed here into a protocol and a
normalised path, checked in that form against the allowed roots, and opened
through that protocol's filesystem with that path: what was checked is what
is read. A root may name `{project}`, which stands for the caller's project
(`/imports/{project}`), so each project reads only its own folder.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from tunewire.services.common.errors import InvalidArgument

LOCAL = "file"
# Storage a source may live on: plain filesystems and object stores, no
# wrappers of other filesystems and nothing fetched from an arbitrary host.
PROTOCOLS = (LOCAL, "s3", "gs", "gcs", "az", "abfs", "memory")
_GLOB = set("*?[]")


@dataclass(frozen=True)
class Source:
    """A parsed, normalised storage location."""

    protocol: str
    path: str

    @property
    def uri(self) -> str:
        return self.path if self.protocol == LOCAL else f"{self.protocol}://{self.path}"

    def filesystem(self):
        import fsspec

        return fsspec.filesystem(self.protocol)

    def open(self, mode: str = "rb"):
        """The source opened through its own filesystem: no chaining, no
        compression guessed from the name, no glob."""
        return self.filesystem().open(self.path, mode)

    def within(self, root: Source) -> bool:
        return self.protocol == root.protocol and (self.path == root.path or self.path.startswith(root.path.rstrip("/") + "/"))


def parse_source(text: str, field: str = "source_uri") -> Source:
    """The source `text` names, or InvalidArgument naming `field` and what is
    wrong. Local paths are resolved (so '..' and symlinks are followed to
    where they lead); an object-store path may not contain '..' at all,
    since a store reads it as a literal key."""

    def bad(reason: str) -> InvalidArgument:
        return InvalidArgument.field(field, f"{text!r}: {reason}")

    if not text:
        raise InvalidArgument.field(field, "required: a path or URL")
    if any(ord(c) < 32 for c in text):
        raise bad("must not contain control characters (NUL, newlines, tabs)")
    if "::" in text:
        raise bad("chained URLs ('::') are not accepted: give one path or one URL")
    protocol, sep, rest = text.partition("://")
    if not sep:
        protocol, rest = LOCAL, text
    protocol = protocol.lower()
    if protocol not in PROTOCOLS:
        raise bad(f"protocol {protocol!r} is not accepted: use a path or one of {', '.join(p + '://' for p in PROTOCOLS[1:])}")
    if _GLOB & set(rest):
        raise bad("must not contain glob characters (* ? [ ])")
    if protocol == LOCAL:
        return Source(LOCAL, str(Path(rest).resolve()))
    if "?" in rest or "#" in rest or ".." in rest.split("/"):
        raise bad("an object-store path may not contain '..', '?' or '#'")
    path = posixpath.normpath(rest).lstrip("/") if protocol != "memory" else posixpath.normpath("/" + rest)
    if not path.strip("/"):
        raise bad("names no bucket or path")
    return Source(protocol, path)


def roots_for(roots: tuple[str, ...], project: str) -> tuple[str, ...]:
    """The roots with `{project}` replaced by the caller's project."""
    return tuple(root.replace("{project}", project) for root in roots)


def check_source(source_uri: str, roots: tuple[str, ...], field: str = "source_uri", outside: tuple[str, ...] = ()) -> Source:
    """The parsed source if it lies under one of `roots` and under none of
    `outside` (paths or URLs), else InvalidArgument naming `field`."""
    source = parse_source(source_uri, field)
    if any(source.within(parse_source(o, "root")) for o in outside) or not any(source.within(parse_source(r, "root")) for r in roots):
        raise InvalidArgument.field(field, f"{source_uri!r} is outside the allowed roots {list(roots)}")
    return source
