"""A job's curves in TensorBoard event files and a real local MLflow store
(SQLite), fed the events the orchestrator records."""

from __future__ import annotations

import struct
from pathlib import Path

from tunewire.services.training.tracking import Tracking, metrics_of

EVENTS = [
    ("state", {"state": "RUNNING"}),
    ("step", {"run": "trial-1", "step": 1, "loss": 3.5, "learning_rate": 2e-3, "tokens_per_second": 200.0}),
    ("step", {"run": "trial-1", "step": 2, "loss": 2.5, "learning_rate": 1.9e-3, "tokens_per_second": 210.0}),
    ("eval", {"run": "trial-1", "split": "validation", "step": 2, "loss": 2.0, "perplexity": 7.4, "answer_recall": 0.5}),
    ("log", {"message": "a line, no curve"}),
    (
        "evaluation",
        {
            "best_step": 2,
            "base_metrics": {"exact_match": 0.0},
            "tuned_metrics": {"exact_match": 0.75},
            "general_kept": 0.97,
            "reference_perplexity_after": float("nan"),
        },
    ),
]


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars in TensorBoard event files (TFRecord: length, CRC, an Event, CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_the_events_become_curves_per_run_and_the_final_evaluation():
    assert metrics_of("step", {"step": 4, "loss": 1.0}) == (4, {"training/loss": 1.0})  # a job that trains once
    assert metrics_of("step", EVENTS[1][1]) == (
        1,
        {"training/loss/trial-1": 3.5, "training/learning_rate/trial-1": 2e-3, "training/tokens_per_second/trial-1": 200.0},
    )
    assert metrics_of("log", EVENTS[4][1])[1] == {}
    step, values = metrics_of("evaluation", EVENTS[5][1])
    assert step == 2 and values == {"test/base/exact_match": 0.0, "test/tuned/exact_match": 0.75, "general/general_kept": 0.97}


def test_a_job_logs_to_tensorboard_files_and_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(tmp_path / "tensorboard", uri)
    tracker = tracking.start("job-1", "support", {"learning_rate": 2e-3, "lora_target_modules": ["all-linear"]})
    for kind, data in EVENTS:
        tracker.record(kind, data)
    # Flushed, the curves are in the files before the run ends (the job shows as succeeded after this).
    tracker.flush()
    scalars = read_scalars(tmp_path / "tensorboard" / "job-1")
    assert scalars["training/loss/trial-1"] == [(1, 3.5), (2, 2.5)]
    assert scalars["validation/answer_recall/trial-1"] == [(2, 0.5)] and scalars["test/tuned/exact_match"] == [(2, 0.75)]
    tracker.close("SUCCEEDED")
    assert read_scalars(tmp_path / "tensorboard" / "job-1") == scalars

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("tunewire-support").experiment_id])
    assert run.info.run_name == "job-1" and run.info.status == "FINISHED"
    assert run.data.params == {"learning_rate": "0.002", "lora_target_modules": "all-linear"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "training/loss/trial-1")] == [(1, 3.5), (2, 2.5)]
    # An orchestrator that restarts goes on in the job's run rather than starting another.
    again = tracking.start("job-1", "support", {"learning_rate": 2e-3})
    again.record("step", {"run": "trial-1", "step": 3, "loss": 1.5})
    again.close("CANCELLED")
    [run] = client.search_runs([run.info.experiment_id])
    assert run.info.status == "KILLED" and len(client.get_metric_history(run.info.run_id, "training/loss/trial-1")) == 3


def test_a_tracking_store_that_fails_never_fails_the_job(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    tracker = Tracking(blocked / "tensorboard", "http://127.0.0.1:1").start("job-2", "default", {})
    for kind, data in EVENTS:
        tracker.record(kind, data)  # nothing raised
    tracker.flush(timeout=5)
    tracker.close("FAILED")
