"""Runs a job as a Ray Train TorchTrainer and relays its progress.

Ray is started by the orchestrator (a local cluster) unless RAY_ADDRESS names
one. Workers read the train and validation splits from the artifact store
through Ray Data shards; rank 0 sends progress through a Ray queue, which this
runner drains into job events while fit() runs in a thread, and watches a
second queue for cancellation. Checkpoints go to <artifact root>/ray/<job>.<attempt>/;
a job that runs again after the orchestrator restarted resumes from the
latest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.training.config import TASK_OF_FORMAT, TrainingConfig
from tunewire.services.training.scheduler import EmitEvent, JobCancelled, JobFailed
from tunewire.services.training.store import Job
from tunewire.services.training.train_loop import list_checkpoints

log = logging.getLogger(__name__)


class RayTrainRunner:
    def __init__(self, ray_address: str, num_cpus: int, artifacts: ArtifactStore, model_cache: Path):
        self.ray_address = ray_address
        self.num_cpus = num_cpus
        self.artifacts = artifacts
        self.storage_path = artifacts.uri("ray")
        self.model_cache = model_cache

    def start(self) -> None:
        """Connects to Ray (blocking, seconds): call before serving. A local
        cluster's start-up can time out on a loaded machine: it is retried."""
        import ray
        from tenacity import before_sleep_log, retry, stop_after_attempt, wait_fixed

        if ray.is_initialized():
            return

        @retry(stop=stop_after_attempt(3), wait=wait_fixed(2), reraise=True, before_sleep=before_sleep_log(log, logging.WARNING))
        def connect() -> None:
            try:
                if self.ray_address:
                    ray.init(address=self.ray_address, logging_level=logging.WARNING)
                else:
                    ray.init(num_cpus=self.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
            except Exception:
                ray.shutdown()
                raise

        connect()
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        log.info("Ray ready: %s", ray.cluster_resources())

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoints on storage, oldest first: step, loss, uri, time."""
        return list_checkpoints(self.artifacts, job_id)

    @contextlib.asynccontextmanager
    async def run(self, job: Job, emit: EmitEvent, cancel: asyncio.Event) -> AsyncIterator[Path]:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        from tunewire.services.training.train_loop import train_loop

        workers = job.spec["num_workers"]
        use_gpu = job.spec["use_gpu"]
        gpus = ray.cluster_resources().get("GPU", 0)
        if use_gpu and gpus < workers:
            raise JobFailed(
                f"the job asks for {workers} GPU worker(s) but the Ray cluster has {gpus:g} GPUs: "
                "set use_gpu=false or point RAY_ADDRESS at a cluster with GPUs",
                user_error=True,
            )
        config = TrainingConfig.from_dict(job.config)
        dataset = job.dataset
        steps_per_epoch = config.steps_per_epoch(dataset["train_rows"], workers)
        progress, control = Queue(), Queue()
        datasets = {"train": _split(dataset["uri"], "train")}
        if dataset["validation_rows"] >= workers:
            datasets["validation"] = _split(dataset["uri"], "validation")
        loop_config = {
            "job_id": job.id,
            "base_model": job.spec["base_model"],
            "method": job.spec["method"],
            "task": TASK_OF_FORMAT[dataset["format"]],
            "labels": dataset.get("labels", []),
            "dataset_uri": dataset["uri"],
            "use_gpu": use_gpu,
            "model_cache": str(self.model_cache),
            "training": config.to_dict(),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": steps_per_epoch * config.epochs,
            "has_validation": "validation" in datasets,
            "split_rows": {"train": dataset["train_rows"], "validation": dataset["validation_rows"]},
            "progress": progress,
            "control": control,
        }
        earlier = self.checkpoints(job.id)
        # Workers resume from the job's latest checkpoint, whether Ray replaced
        # them mid-run or the orchestrator restarted and runs the job again.
        loop_config["artifact_root"] = self.artifacts.root
        attempt = len({c["uri"].rsplit("/", 2)[-2] for c in earlier}) + 1
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            datasets=datasets,
            run_config=RunConfig(
                name=f"{job.id}.{attempt}",
                storage_path=self.storage_path,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=config.keep_checkpoints + 1,  # + the final one
                    checkpoint_score_attribute="val_loss" if loop_config["has_validation"] else None,
                    checkpoint_score_order="min",
                ),
                # A worker that dies is replaced and training resumes from the latest checkpoint.
                failure_config=FailureConfig(max_failures=2),
            ),
        )
        how = f"resuming from the checkpoint of step {earlier[-1]['step']}" if earlier else "from the start"
        emit("log", {"message": f"starting Ray Train ({how}): {workers} worker(s), {steps_per_epoch * config.epochs} steps"})
        fit = asyncio.create_task(asyncio.to_thread(trainer.fit))
        try:
            while not fit.done():
                if cancel.is_set() and control.empty():
                    control.put("cancel")
                await _relay(progress, emit, timeout=0.5)
            await _relay(progress, emit, timeout=0)
            result = fit.result()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Ray wraps the worker's exception
            raise _job_failure(exc) from exc
        finally:
            for queue in (progress, control):
                with contextlib.suppress(Exception):
                    queue.shutdown()
        if result.error is not None:
            raise _job_failure(result.error)
        if cancel.is_set() or (result.metrics or {}).get("cancelled"):
            raise JobCancelled()
        if result.checkpoint is None:
            raise JobFailed("training finished without reporting a checkpoint")
        with result.checkpoint.as_directory() as adapter_dir:
            yield Path(adapter_dir)


def _split(uri: str, split: str):
    import pyarrow.compute as pc
    import ray.data

    return ray.data.read_parquet(uri).map_batches(lambda table: table.filter(pc.equal(table["split"], split)), batch_format="pyarrow")


async def _relay(progress, emit: EmitEvent, timeout: float) -> None:
    """Moves everything queued by the workers into job events."""
    from ray.util.queue import Empty

    while True:
        try:
            item = await progress.get_async(block=timeout > 0, timeout=timeout or None)
        except Empty:
            return
        emit(item["kind"], item["data"])
        timeout = 0


def _job_failure(exc: BaseException) -> JobFailed:
    """A JobFailed from Ray's wrapped worker exception: the user's fault when
    the worker said so (JobInputError), the system's otherwise."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    text = "\n".join(str(e) for e in chain)
    if any(type(e).__name__ == "JobInputError" for e in chain) or "JobInputError" in text:
        said = [ln for ln in text.splitlines() if "JobInputError:" in ln]
        return JobFailed(said[-1].split("JobInputError:", 1)[-1].strip() if said else text.splitlines()[-1], user_error=True)
    cause = chain[-1]
    lines = str(cause).strip().splitlines()
    return JobFailed(f"{type(cause).__name__}: {lines[-1] if lines else ''}")
