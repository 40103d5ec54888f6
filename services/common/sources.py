"""Which paths and URLs a request may make a service read."""

from __future__ import annotations

from pathlib import Path

from tunewire.services.common.errors import InvalidArgument


def check_source(source_uri: str, roots: tuple[str, ...], field: str = "source_uri") -> str:
    """The source as a normalised path or URL if it lies under one of `roots`
    (paths or URL prefixes), else InvalidArgument naming `field`. Paths are
    resolved first, so '..' and symlinks cannot leave a root."""
    source = source_uri.removeprefix("file://")
    if "://" not in source:
        source = str(Path(source).resolve())
    for root in roots:
        root = root.removeprefix("file://")
        if "://" not in root:
            root = str(Path(root).resolve())
        if source == root or source.startswith(root.rstrip("/") + "/"):
            return source
    raise InvalidArgument.field(field, f"{source_uri!r} is outside the allowed roots {list(roots)}")
