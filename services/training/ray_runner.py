"""Runs a job as a Ray Train TorchTrainer and relays its progress.

Ray is started by the orchestrator (a local cluster) unless RAY_ADDRESS names
one. Workers read the dataset's Parquet file from the artifact store through
Ray Data shards; rank 0 sends progress through a Ray queue, which this runner
drains into job events while fit() runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from tunewire.services.training.config import TrainingConfig
from tunewire.services.training.scheduler import EmitEvent, JobFailed
from tunewire.services.training.store import Job

log = logging.getLogger(__name__)


class RayTrainRunner:
    def __init__(self, ray_address: str, num_cpus: int, storage_path: str, model_cache: Path):
        self.ray_address = ray_address
        self.num_cpus = num_cpus
        self.storage_path = storage_path
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

    @contextlib.asynccontextmanager
    async def run(self, job: Job, emit: EmitEvent) -> AsyncIterator[Path]:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        from tunewire.services.training.train_loop import train_loop

        workers = job.spec["num_workers"]
        use_gpu = job.spec["use_gpu"]
        if use_gpu and ray.cluster_resources().get("GPU", 0) < workers:
            raise JobFailed(
                f"the job asks for {workers} GPU worker(s) but the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs: "
                "set use_gpu=false or point RAY_ADDRESS at a cluster with GPUs",
                user_error=True,
            )
        config = TrainingConfig.from_dict(job.config)
        dataset = job.dataset
        steps_per_epoch = config.steps_per_epoch(dataset["train_rows"], workers)
        progress = Queue()
        loop_config = {
            "job_id": job.id,
            "base_model": job.spec["base_model"],
            "model_cache": str(self.model_cache),
            "training": config.to_dict(),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": steps_per_epoch * config.epochs,
            "progress": progress,
        }
        datasets = {"train": _split(dataset["uri"], "train")}
        if dataset["validation_rows"] >= workers:
            datasets["validation"] = _split(dataset["uri"], "validation")
        loop_config["has_validation"] = "validation" in datasets
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            datasets=datasets,
            run_config=RunConfig(
                name=job.id,
                storage_path=self.storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                failure_config=FailureConfig(max_failures=1),
            ),
        )
        emit("log", {"message": f"starting Ray Train: {workers} worker(s), {steps_per_epoch * config.epochs} steps"})
        fit = asyncio.create_task(asyncio.to_thread(trainer.fit))
        try:
            while not fit.done():
                await _relay(progress, emit, timeout=0.5)
            await _relay(progress, emit, timeout=0)
            result = fit.result()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Ray wraps the worker's exception
            raise JobFailed(_worker_error(exc)) from exc
        finally:
            with contextlib.suppress(Exception):
                progress.shutdown()
        if result.error is not None:
            raise JobFailed(_worker_error(result.error))
        if result.checkpoint is None:
            raise JobFailed("training finished without reporting an adapter checkpoint")
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


def _worker_error(exc: BaseException) -> str:
    """The innermost message of Ray's wrapped worker exception."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
