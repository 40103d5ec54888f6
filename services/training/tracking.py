"""A job's curves where ML engineers look for them, beside its event stream:

- TensorBoard event files (tensorboardX; no server needed), on by default,
  under `tensorboard/<job id>/` in the artifact store (`tensorboard --logdir
  <artifact root>/tensorboard`); for an artifact store that is not a local
  directory, under `$TUNEWIRE_HOME/tensorboard/`;
- MLflow, when `MLFLOW_TRACKING_URI` names a tracking store (a server, a
  directory, SQLite): one run per job in the experiment `tunewire-<project>`,
  its hyperparameters as params, the same metrics, and how it ended.

The orchestrator feeds every event it records to the job's tracker: each
step's loss, learning rate and tokens/s, each validation, the final
evaluation (base vs tuned), per run (a search's trials side by side). A
tracker that fails logs why and is dropped: tracking never fails a job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path

from tunewire.services.common.layout import SINGLE_RUN

log = logging.getLogger(__name__)

_STEP_METRICS = ("loss", "learning_rate", "tokens_per_second")
_EVAL_METRICS = ("loss", "perplexity", "answer_recall", "general_kept")
_REPORT_METRICS = ("general_kept", "reference_perplexity_before", "reference_perplexity_after")


def metrics_of(kind: str, data: dict) -> tuple[int, dict[str, float]]:
    """The (step, {tag: value}) an event holds, tagged by run; none for
    events without curves (logs, checkpoints, states)."""
    run = data.get("run") or SINGLE_RUN
    # Grouped by section (what TensorBoard shows together), a search's trials side by side in each.
    suffix = "" if run == SINGLE_RUN else f"/{run}"
    values: dict[str, float] = {}
    if kind == "step":
        values = {f"training/{k}{suffix}": data[k] for k in _STEP_METRICS if k in data}
    elif kind == "eval":
        values = {f"{data.get('split', 'validation')}/{k}{suffix}": data[k] for k in _EVAL_METRICS if data.get(k) is not None}
    elif kind == "evaluation":
        for side in ("base", "tuned"):
            values |= {f"test/{side}/{k}": v for k, v in (data.get(f"{side}_metrics") or {}).items()}
        values |= {f"general/{k}": data[k] for k in _REPORT_METRICS if k in data}
        return int(data.get("best_step", 0)), _finite(values)
    return int(data.get("step", 0)), _finite(values)


def _finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}


# Queued in place of a step: write out what came before, then set the event.
_FLUSH = object()


class JobTracker:
    """One job's writers (TensorBoard, MLflow: either may be absent), fed
    through a bounded queue by a thread of their own: a slow or unreachable
    store never holds up the orchestrator (when the queue is full, metrics
    are dropped, and the log says how many)."""

    QUEUE_EVENTS = 10_000

    def __init__(self, job_id: str, project: str, hyperparameters: dict, tensorboard_dir: Path | None, mlflow_uri: str):
        self.job_id = job_id
        self._tensorboard = None
        self._mlflow = None
        self._run_id = ""
        self._dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUE_EVENTS)
        self._thread = threading.Thread(
            target=self._work, args=(project, hyperparameters, tensorboard_dir, mlflow_uri), name=f"tracking {job_id}", daemon=True
        )
        self._thread.start()

    def record(self, kind: str, data: dict) -> None:
        """Queues the event's metrics (returns at once)."""
        step, values = metrics_of(kind, data)
        if not values:
            return
        try:
            self._queue.put_nowait((step, values))
        except queue.Full:
            self._dropped += 1

    def flush(self, timeout: float = 30.0) -> None:
        """Waits (up to `timeout`) until what was queued so far is written:
        a job's curves are complete when its end becomes visible."""
        written = threading.Event()
        with contextlib.suppress(queue.Full):
            self._queue.put((_FLUSH, written), timeout=timeout)
            written.wait(timeout)

    def close(self, state: str, timeout: float = 30.0) -> None:
        """Writes what is queued and ends the run. `state`: SUCCEEDED, FAILED
        or CANCELLED where the job ended; RUNNING for a job the orchestrator
        left to resume elsewhere (its MLflow run stays open)."""
        with contextlib.suppress(queue.Full):
            self._queue.put((None, state), timeout=timeout)
        self._thread.join(timeout)
        if self._dropped:
            log.warning("job %s: %d metric events were not tracked: the tracking store was too slow", self.job_id, self._dropped)

    # The tracking thread

    def _work(self, project: str, hyperparameters: dict, tensorboard_dir: Path | None, mlflow_uri: str) -> None:
        if tensorboard_dir is not None:
            self._guard("TensorBoard", lambda: self._open_tensorboard(tensorboard_dir))
        if mlflow_uri:
            self._guard("MLflow", lambda: self._open_mlflow(mlflow_uri, project, hyperparameters))
        while True:
            step, item = self._queue.get()
            if step is None:
                self._finish(item)
                return
            if step is _FLUSH:
                if self._tensorboard is not None:
                    self._guard("TensorBoard", self._tensorboard.flush)
                item.set()
                continue
            self._write(step, item)

    def _open_tensorboard(self, directory: Path) -> None:
        from tensorboardX import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        self._tensorboard = SummaryWriter(logdir=str(directory), flush_secs=10)

    def _open_mlflow(self, uri: str, project: str, hyperparameters: dict) -> None:
        # MLflow retries an unreachable server for minutes by default: a few
        # seconds, then tracking is off for the job.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        name = f"tunewire-{project}"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        # A job resumed after an orchestrator restart goes on in its run.
        found = client.search_runs([experiment_id], filter_string=f"tags.tunewire_job = '{self.job_id}'", max_results=1)
        if found:
            self._run_id = found[0].info.run_id
        else:
            run = client.create_run(experiment_id, run_name=self.job_id, tags={"tunewire_job": self.job_id, "tunewire_project": project})
            self._run_id = run.info.run_id
            params = [Param(k, ",".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in hyperparameters.items()]
            client.log_batch(self._run_id, params=params)
        self._mlflow = client

    def _write(self, step: int, values: dict[str, float]) -> None:
        if self._tensorboard is not None:
            self._guard("TensorBoard", lambda: [self._tensorboard.add_scalar(tag, value, step) for tag, value in values.items()])
        if self._mlflow is not None:
            from mlflow.entities import Metric

            timestamp = int(time.time() * 1000)
            metrics = [Metric(tag, value, timestamp, step) for tag, value in values.items()]
            self._guard("MLflow", lambda: self._mlflow.log_batch(self._run_id, metrics=metrics))

    def _finish(self, state: str) -> None:
        if self._tensorboard is not None:
            self._guard("TensorBoard", self._tensorboard.close)
        if self._mlflow is not None and state != "RUNNING":
            status = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED"}.get(state, "FAILED")
            self._guard("MLflow", lambda: self._mlflow.set_terminated(self._run_id, status))

    def _guard(self, what: str, action) -> None:
        try:
            action()
        except Exception:  # noqa: BLE001 - tracking must never fail a job
            log.warning("job %s: %s tracking failed and is off for this job", self.job_id, what, exc_info=True)
            if what == "TensorBoard":
                self._tensorboard = None
            else:
                self._mlflow = None


class Tracking:
    """Makes each job's tracker from the service's settings."""

    def __init__(self, tensorboard_root: Path | None, mlflow_uri: str = ""):
        self.tensorboard_root = tensorboard_root
        self.mlflow_uri = mlflow_uri

    def start(self, job_id: str, project: str, hyperparameters: dict) -> JobTracker:
        directory = self.tensorboard_root / job_id if self.tensorboard_root is not None else None
        return JobTracker(job_id, project, hyperparameters, directory, self.mlflow_uri)
