"""Starts the three services as separate processes on this machine (the
embedded defaults: local Ray, SQLite, a local artifact directory) and stops
them with SIGTERM. Used by `tunewire serve`, the demo and end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunewire.clients.sdk import DatasetClient, InferenceClient, TrainingClient

SERVICES = ("dataset", "training", "inference")


def free_port() -> int:
    """A port the OS has just handed out, so local services never collide
    with each other or with the ephemeral ports Ray and other clients hold."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalStack:
    env: dict[str, str] = field(default_factory=dict)  # TUNEWIRE_* settings for the services
    services: tuple[str, ...] = SERVICES
    log_dir: Path | None = None  # each service's output goes to <log_dir>/<service>.log; None: inherit
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def address(self, service: str) -> str:
        host = self.env.get("TUNEWIRE_HOST", os.environ.get("TUNEWIRE_HOST", "127.0.0.1"))
        default = {"dataset": 50051, "training": 50052, "inference": 50053}[service]
        key = f"TUNEWIRE_{service.upper()}_PORT"
        return f"{host}:{self.env.get(key, os.environ.get(key, default))}"

    def start(self) -> None:
        env = {**os.environ, **self.env}
        for service in self.services:
            output = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                output = open(self.log_dir / f"{service}.log", "ab")
            self.processes[service] = subprocess.Popen(
                [sys.executable, "-m", f"tunewire.services.{service}"],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
            )

    def wait_until_serving(self, timeout: float = 300.0) -> None:
        clients = {"dataset": DatasetClient, "training": TrainingClient, "inference": InferenceClient}
        deadline = time.monotonic() + timeout
        for service in self.services:
            with clients[service](self.address(service)) as client:
                while True:
                    process = self.processes.get(service)
                    if process is not None and process.poll() is not None:
                        raise RuntimeError(
                            f"the {service} service exited with code {process.returncode} during start-up{self._log_tail(service)}"
                        )
                    try:
                        client.wait_until_serving(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise

    def _log_tail(self, service: str, lines: int = 15) -> str:
        """The end of a service's log, so a start-up failure says why without
        a second look (a port in use, a bad setting)."""
        if self.log_dir is None:
            return ""
        log = self.log_dir / f"{service}.log"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
        return f"; see {log}" + "".join(f"\n  {line}" for line in tail)

    def stop(self, grace: float = 30.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> LocalStack:
        self.start()
        try:
            self.wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
