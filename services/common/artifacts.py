"""The artifact store: where bytes live (datasets, checkpoints, adapters).

A local directory by default, any fsspec URL (s3://, a mounted volume) at
scale. Writes are staged under a temporary name and moved into place, so a
reader never sees half an artifact. On a local disk the move is one rename.
An object store has no rename: a move copies object by object, so there the
artifact counts as present only once its COMPLETE marker, written last,
exists; one interrupted half-way is replaced by the next publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
STAGING = ".staging"
# A staging copy or download untouched this long is a crashed one's leftover.
STALE_SECONDS = 3600.0


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.fs.makedirs(self._root_path, exist_ok=True)

    @property
    def is_local(self) -> bool:
        return _is_local(self.fs)

    def uri(self, *parts: str) -> str:
        """The address of a path inside the store, as workers should open it."""
        return "/".join([self.root, *parts])

    def path(self, *parts: str) -> str:
        """The path inside the store's filesystem (no protocol)."""
        return "/".join([self._root_path, *parts])

    def exists(self, *parts: str) -> bool:
        """Whether a whole artifact is at parts."""
        if self.is_local:
            return self.fs.exists(self.path(*parts))
        return self.fs.exists(self.path(*parts, COMPLETE_MARKER))

    def files(self, *parts: str) -> list[tuple[str, int]]:
        """The files of the artifact at parts: (path inside it, bytes), in
        order, its completion marker left out."""
        base = self.path(*parts).rstrip("/")
        found = self.fs.find(base, detail=True)
        return sorted((path[len(base) + 1 :], int(info["size"])) for path, info in found.items() if not path.endswith(COMPLETE_MARKER))

    def read_chunks(self, *parts: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """A file's bytes, a chunk at a time (at least one chunk, empty for an empty file)."""
        with self.fs.open(self.path(*parts), "rb") as file:
            while True:
                chunk = file.read(chunk_bytes)
                yield chunk
                if len(chunk) < chunk_bytes:
                    return

    @contextlib.contextmanager
    def staged_dir(self) -> Iterator[Path]:
        """A local scratch directory for building an artifact before publish_dir."""
        with tempfile.TemporaryDirectory(prefix="tunewire-") as tmp:
            yield Path(tmp)

    def publish_dir(self, local_dir: Path, *parts: str) -> str:
        """Copies local_dir into the store at parts, atomically where the
        filesystem allows it (a rename on local disks), and returns its URI.
        An existing artifact at that path is left as it is (content-addressed
        artifacts are identical)."""
        final = self.path(*parts)
        if self.exists(*parts):
            return self.uri(*parts)
        if self.fs.exists(final):  # an object-store move cut short: its marker never came
            self.fs.rm(final, recursive=True)
        staging = self.path(STAGING, uuid.uuid4().hex)
        self.fs.makedirs(staging.rsplit("/", 1)[0], exist_ok=True)
        try:
            if self.is_local:
                shutil.copytree(local_dir, staging)
            else:
                self.fs.put(str(local_dir), staging, recursive=True)
        except BaseException:
            with contextlib.suppress(OSError):  # best effort: the store may be what failed
                self.fs.rm(staging, recursive=True)
            raise
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        try:
            if self.is_local:
                # rename(2) of a directory fails if the target exists and is
                # not empty; a move would put the staging directory inside it.
                os.rename(staging, final)
            else:
                self.fs.mv(staging, final, recursive=True)
        except FileExistsError:
            self.fs.rm(staging, recursive=True)
        except OSError:
            if not self.fs.exists(final):
                raise
            self.fs.rm(staging, recursive=True)
        if not self.is_local:
            self.fs.pipe_file(self.path(*parts, COMPLETE_MARKER), b"")
        return self.uri(*parts)

    def sweep_staging(self, older_than_seconds: float = STALE_SECONDS) -> int:
        """Removes staging copies that a publish cut short left behind (a
        crash between copy and move); those younger than `older_than_seconds`
        may be another replica's publish in progress and are kept. Returns
        how many were removed."""
        root = self.path(STAGING)
        if not self.fs.exists(root):
            return 0
        removed = 0
        for entry in self.fs.ls(root, detail=False):
            files = self.fs.find(entry) or [entry]
            try:
                newest = max(self.fs.modified(f).timestamp() for f in files)
            except (OSError, NotImplementedError):
                continue
            if time.time() - newest > older_than_seconds:
                with contextlib.suppress(OSError):
                    self.fs.rm(entry, recursive=True)
                    removed += 1
        return removed

    def local_copy(self, uri: str, cache_dir: Path) -> Path:
        """A local directory with the artifact's files: the path itself for a
        local store, else a download into cache_dir."""
        fs, path = fsspec.core.url_to_fs(uri)
        if _is_local(fs):
            return Path(path)
        target = cache_dir / path.strip("/").replace("/", "_")
        if not target.exists():
            sweep_partial_downloads(cache_dir)
            partial = target.with_name(target.name + f".partial-{uuid.uuid4().hex}")
            fs.get(path, str(partial), recursive=True)
            partial.rename(target)
        return target

    def delete(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def read_text(uri: str) -> str:
    """A small file of the store (or any fsspec URL), read whole."""
    with fsspec.open(uri, "r") as f:
        return f.read()


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def sweep_partial_downloads(cache_dir: Path, older_than_seconds: float = STALE_SECONDS) -> None:
    """Removes downloads into cache_dir that a crash cut short (`*.partial-*`)."""
    for partial in cache_dir.glob("*.partial-*"):
        with contextlib.suppress(OSError):
            if time.time() - partial.stat().st_mtime > older_than_seconds:
                shutil.rmtree(partial, ignore_errors=True)


async def sweep_crash_leftovers(store: ArtifactStore) -> None:
    """At a service's start: the staging copies a crashed publish left."""
    removed = await asyncio.to_thread(store.sweep_staging)
    if removed:
        log.info("removed %d staging copies that a crashed publish left in %s", removed, store.root)
