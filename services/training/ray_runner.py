"""Runs a job on Ray and relays its progress.

A job runs in three phases, each resumable after an orchestrator restart:

1. the base model is measured (`recipe.measure_base`, a Ray task; its result
   is kept in the job's artifact directory);
2. training: one Ray Train `TorchTrainer` run, or a search whose trials are
   Ray Tune trials of such runs (`search`);
3. the best checkpoint of all runs (validation loss among those within the
   forgetting budget) is evaluated and made into the directory to publish
   (`recipe.evaluate_and_publish`, a Ray task).

Ray is started by the orchestrator (a local cluster) unless RAY_ADDRESS names
one. On a local cluster the orchestrator runs the phases itself (`run_phases`);
on a cluster of the operator's own, each job's phases run as a Ray Job on the
head (`ray_jobs`, `job_driver`), which trains on while the orchestrator
restarts and is reattached. Workers read the train and validation splits
from the artifact store through Ray Data shards; rank 0 of each run sends
progress through a Ray queue, which the phases' driver drains into job events
while the phase runs in a thread, and watches a second queue for cancellation.
Checkpoints go to <artifact root>/ray/<job>/<run>.<attempt>/; a run that
starts again resumes from its latest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from tunewire.services.common import layout
from tunewire.services.common.artifacts import ArtifactStore, read_text
from tunewire.services.training import diagnostics
from tunewire.services.training.config import FULL, TASK_OF_FORMAT, TrainingConfig, resolve_search
from tunewire.services.training.ray_jobs import RayJobs
from tunewire.services.training.recipe import RecipeConfig, list_checkpoints
from tunewire.services.training.scheduler import EmitEvent, JobCancelled, JobFailed
from tunewire.services.training.store import Job

log = logging.getLogger(__name__)

# How long a phase whose orchestrator stops may take to wind down (within
# Kubernetes' default 30 s termination grace period).
STOP_WAIT_SECONDS = 20.0
# How long a phase looks again before it says it waits for room.
WAITING_RECHECK_SECONDS = 1.0
# How often a running phase checks that the cluster still has its room.
ROOM_CHECK_SECONDS = 5.0
# How long a Ray Train controller waits for its workers' placement group
# before it tries again (Ray's default is 60 s). A cancel reaches a run that
# waits for room only between tries (cancel_check), so this bounds how long
# it takes to let go. An operator's own RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S wins.
WORKER_GROUP_START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_START_TIMEOUT_SECONDS = 10
# How often a Ray Train controller polls its workers (Ray's default is 2 s):
# a run's end is seen at a poll, so each run (each trial of a search) ended
# about 6 s after its last step; at 0.25 s, about 1.5 s. An operator's own
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins.
HEALTH_CHECK_INTERVAL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_SECONDS = 0.25


class RayConnectionError(ConnectionError):
    """The Ray cluster RAY_ADDRESS names cannot be used, and why."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fails at once, naming the address, when nothing accepts connections
    at a host:port Ray address (Ray itself retries for minutes)."""
    import socket

    if "://" in address or ":" not in address:  # "auto", or a scheme Ray resolves itself
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise RayConnectionError(
            f"no Ray cluster answers at RAY_ADDRESS={address} ({exc}): start one there (`ray start --head`), or set "
            "RAY_ADDRESS to its head node's GCS address (host:6379); leave it empty for a local Ray"
        ) from exc


def ray_token_source() -> str:
    """Where Ray's clients find a token here ("" where none is), in Ray's order."""
    for variable in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        if os.environ.get(variable):
            return variable
    return "~/.ray/auth_token" if (Path.home() / ".ray" / "auth_token").exists() else ""


def job_runtime_env() -> dict:
    """What every task and actor of the service's Ray job runs with (the
    Ray Train controllers of Ray Tune's trials among them)."""
    return {
        "env_vars": {
            WORKER_GROUP_START_TIMEOUT_VAR: os.environ.get(WORKER_GROUP_START_TIMEOUT_VAR, str(WORKER_GROUP_START_TIMEOUT_SECONDS)),
            HEALTH_CHECK_INTERVAL_VAR: os.environ.get(HEALTH_CHECK_INTERVAL_VAR, str(HEALTH_CHECK_INTERVAL_SECONDS)),
        }
    }


class RayTrainRunner:
    def __init__(self, ray_address: str, num_cpus: int, artifacts: ArtifactStore, model_cache: Path):
        self.ray_address = ray_address
        self.num_cpus = num_cpus
        self.artifacts = artifacts
        self.model_cache = model_cache
        # On a cluster of its own, each job runs as a Ray Job (set by start()).
        self.ray_jobs: RayJobs | None = None

    def start(self) -> None:
        """Connects to Ray (blocking, seconds): call before serving. An
        existing cluster that cannot be used stops the service, saying why; a
        local cluster's start-up can time out on a loaded machine: it is retried."""
        import ray

        if ray.is_initialized():
            return
        if self.ray_address:
            self._connect_to_cluster()
        else:
            self._start_local_cluster()
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        log.info("Ray ready: %s", ray.cluster_resources())

    def _connect_to_cluster(self) -> None:
        import ray
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

        check_reachable(self.ray_address)
        token = ray_token_source()
        # A driver joining a cluster sends a token only in token mode
        # (RAY_AUTH_MODE=token). Ray's own rule for when it is unset: token
        # mode where a token is found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
        # ~/.ray/auth_token); a cluster without authentication ignores it.
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        try:
            context = ray.init(address=self.ray_address, runtime_env=job_runtime_env(), logging_level=logging.WARNING)
        except ConnectionError as exc:
            ray.shutdown()
            # It answered (check_reachable), then refused: Ray's error does not
            # say why, and its log names the cause only among its retries.
            cause = (
                f"the token in {token} is not the cluster's"
                if token
                else "it most likely requires Ray's token authentication (Ray 2.60's default) and no token was given: set "
                "RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it (a mounted secret); "
                "`ray get-auth-token` on the head prints it"
            )
            raise RayConnectionError(
                f"the Ray cluster at RAY_ADDRESS={self.ray_address} answers but refused this service: {cause}. "
                f"Otherwise it may run another Ray version than this service's {ray.__version__}"
            ) from exc
        if not context.dashboard_url:
            ray.shutdown()
            raise RayConnectionError(
                f"the Ray cluster at RAY_ADDRESS={self.ray_address} runs no dashboard: tunewire submits each job to it as a Ray Job "
                "through the head's dashboard. Start the head with it (`ray start --head --include-dashboard=true`, Ray's default)"
            )
        try:
            self.ray_jobs = RayJobs.at(context.dashboard_url)
        except ConnectionError as exc:
            ray.shutdown()
            raise RayConnectionError(
                f"the Ray cluster at RAY_ADDRESS={self.ray_address} has its dashboard at {context.dashboard_url}, which this service "
                f"cannot reach ({exc}): tunewire submits each job there as a Ray Job. Start the head with "
                "`ray start --head --dashboard-host=0.0.0.0` (and let this service reach its port)"
            ) from exc

    def _start_local_cluster(self) -> None:
        import ray
        from tenacity import before_sleep_log, retry, stop_after_attempt, wait_fixed

        @retry(stop=stop_after_attempt(3), wait=wait_fixed(2), reraise=True, before_sleep=before_sleep_log(log, logging.WARNING))
        def start() -> None:
            try:
                # The dashboard serves Ray's state API, which Ray Train uses to
                # free the workers of a run whose driver was stopped (as Ray Tune
                # stops a trial): without it their CPUs stay reserved.
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=None,
                    runtime_env=job_runtime_env(),
                    logging_level=logging.WARNING,
                )
            except Exception:
                ray.shutdown()
                raise

        start()

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoints on storage, of every run, oldest first."""
        return list_checkpoints(self.artifacts, job_id)

    def recipe(self, job: Job) -> RecipeConfig:
        dataset = job.dataset
        return RecipeConfig(
            job_id=job.id,
            project=job.project,
            base_model=job.spec["base_model"],
            task=TASK_OF_FORMAT[dataset["format"]],
            method=job.spec["method"],
            dataset_uri=dataset["uri"],
            dataset_id=dataset["id"],
            train_rows=dataset["train_rows"],
            validation_rows=dataset["validation_rows"],
            num_workers=job.spec["num_workers"],
            use_gpu=job.spec["use_gpu"],
            model_cache=str(self.model_cache),
            artifact_root=self.artifacts.root,
            training=TrainingConfig.from_dict(job.config),
            labels=tuple(dataset.get("labels", [])),
        )

    @contextlib.asynccontextmanager
    async def run(self, job: Job, emit: EmitEvent, cancel: asyncio.Event) -> AsyncIterator[Path]:
        import ray

        recipe = self.recipe(job)

        async def check() -> None:
            check_fits(recipe, ray.cluster_resources())
            check_memory(recipe, await asyncio.to_thread(worker_memory_floor, recipe), largest_node_memory())

        final = layout.job_parts(job.id, layout.FINAL_DIR)
        request = JobRequest(recipe, job.spec.get("search") or {}, job.spec["hyperparameters"], self._room_for_trials(recipe))
        if self.ray_jobs is not None:
            # A Ray Job that wrote the adapter before this orchestrator came may
            # still hold events to relay; one that runs is not judged again.
            if not self.artifacts.exists(*final) or await self.ray_jobs.has_unfinished(job.id):
                await self.ray_jobs.run(request, emit, cancel, before_submit=check)
        elif not self.artifacts.exists(*final):
            await check()
            await run_phases(self.artifacts, request, emit, cancel)
        with contextlib.ExitStack() as stack:
            downloads = stack.enter_context(self.artifacts.staged_dir()) if not self.artifacts.is_local else None
            yield self.artifacts.local_copy(self.artifacts.uri(*final), downloads or Path())

    async def unfinished_job_ids(self) -> set[str]:
        """The jobs whose Ray Job runs on (none on a local Ray: the orchestrator drives them)."""
        return set() if self.ray_jobs is None else await self.ray_jobs.unfinished_job_ids()

    async def abandon(self, job_id: str) -> None:
        if self.ray_jobs is not None:
            await self.ray_jobs.abandon(job_id)

    def _room_for_trials(self, recipe: RecipeConfig) -> int:
        """Trials side by side: one on a local cluster (its workers already
        use every core), else as many runs as the cluster's resources hold
        at once (`run_needs`: workers, and Ray Data's reading where it streams)."""
        import ray

        if not self.ray_address:
            return 1
        resources = ray.cluster_resources()
        return max(1, min(int(resources.get(r, 0.0) // n) for r, n in run_needs(recipe).items() if n > 0))


@dataclass(frozen=True)
class JobRequest:
    """What a job's phases need: its recipe, the search and hyperparameters it
    asked for, and how many trials the cluster holds side by side."""

    recipe: RecipeConfig
    search: dict
    hyperparameters: dict
    room_for_trials: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobRequest:
        data = json.loads(text)
        recipe = data.pop("recipe")
        training = TrainingConfig.from_dict(recipe.pop("training"))
        return cls(RecipeConfig(**recipe | {"training": training, "labels": tuple(recipe["labels"])}), **data)


async def run_phases(artifacts: ArtifactStore, request: JobRequest, emit: EmitEvent, cancel: asyncio.Event) -> None:
    """Measures the base model, trains (once, or a search) and writes the
    job's final directory. Where it runs is Ray's driver of the job: this
    orchestrator on a local Ray, the job's Ray Job on a cluster (`ray_jobs`)."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    recipe = request.recipe
    # The job's queues live on the driver's own node: a node that leaves
    # mid-job takes its workers, never the job's way to talk to them.
    here = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}
    phases = _Phases(artifacts, recipe, emit, cancel, Queue(actor_options=here), Queue(actor_options=here))
    try:
        base = await phases.measure_base()
        recipe = recipe.replace(general_uri=base.get("general_uri", ""), base_perplexity=base.get("reference_perplexity", 0.0))
        plan = resolve_search(request.search, request.hyperparameters, recipe.method, recipe.train_rows)
        if plan is None:
            trials = await phases.train(recipe)
        else:
            trials = await phases.search(recipe, plan, request.room_for_trials)
        await phases.evaluate_and_publish(recipe, plan, trials, base, layout.job_parts(recipe.job_id, layout.FINAL_DIR))
    finally:
        phases.close()


def _streams_data(recipe: RecipeConfig) -> bool:
    return not all(recipe.kept_in_memory(split) for split in ("train", "validation"))


def run_needs(recipe: RecipeConfig) -> dict[str, float]:
    """What one training run holds at once: its workers, as Ray Train
    reserves them, and a CPU for Ray Data's reading tasks where a split
    streams through Ray Data (they run beside the workers, which hold theirs)."""
    from ray.train import ScalingConfig

    needs = dict(ScalingConfig(num_workers=recipe.num_workers, use_gpu=recipe.use_gpu).total_resources)
    if _streams_data(recipe):
        needs["CPU"] = needs.get("CPU", 0.0) + 1
    return needs


def task_needs(recipe: RecipeConfig) -> dict[str, float]:
    """What the base measurement and the evaluation (one Ray task each) hold."""
    return {"CPU": 1.0} | ({"GPU": 1.0} if recipe.use_gpu else {})


def shortfall(needs: dict[str, float], have: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Each resource `needs` asks more of than `have` holds: (needed, held)."""
    return {r: (n, have.get(r, 0.0)) for r, n in sorted(needs.items()) if n > have.get(r, 0.0) + 1e-9}


def describe_shortfall(short: dict[str, tuple[float, float]], having: str) -> str:
    """Each resource `shortfall` found short, in words: '2 CPU (1 free now)',
    with `having` ('{:g} free now') saying what there is."""
    return " and ".join(f"{n:g} {r} ({having.format(h)})" for r, (n, h) in short.items())


def check_fits(recipe: RecipeConfig, cluster: dict[str, float]) -> None:
    """Fails the job at once, as the user's error, when a phase of it could
    never be placed on the cluster (`cluster`: Ray's total resources)."""
    missing = shortfall(run_needs(recipe), cluster) | shortfall(task_needs(recipe), cluster)
    if not missing:
        return
    what = describe_shortfall(missing, "the Ray cluster has {:g} in all")
    whose = f"{recipe.num_workers} worker(s)" + (" and Ray Data's reading of its splits" if _streams_data(recipe) else "")
    hint = (
        "set use_gpu=false or point RAY_ADDRESS at a cluster with GPUs"
        if "GPU" in missing
        else "lower num_workers or add nodes to the Ray cluster"
    )
    raise JobFailed(f"the job can never start: its {whose} need {what} at once: {hint}", user_error=True)


def worker_memory_floor(recipe: RecipeConfig) -> int | None:
    """The least memory one worker needs: the base model's weights, and the
    trainable part's gradients and optimizer state (activations come on top).
    None where the model's config is not on this machine (a hub id, a bundled
    model not converted yet): the workers find out as they load it."""
    from tunewire.services.common.models import TRANSFORMERS_IMPORT_LOCK, local_model_dir
    from tunewire.services.training.estimate import count_parameters, weights_bytes

    path = local_model_dir(recipe.base_model, Path(recipe.model_cache))
    if path is None:
        return None
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoConfig
    parameters, trainable = count_parameters(
        AutoConfig.from_pretrained(path), recipe.task, recipe.method, recipe.training, len(recipe.labels)
    )
    return weights_bytes(parameters, trainable, recipe.training.ema_decay > 0)


def largest_node_memory() -> float:
    """The most memory one live node of the Ray cluster has for tasks and actors."""
    import ray

    return max((n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def check_memory(recipe: RecipeConfig, worker_needs: int | None, largest_node: float) -> None:
    """Fails the job at once, as the user's error, when one worker's share of
    the model could never fit the memory of the cluster's largest node (Ray
    reserves no memory for tasks: such a worker would start and be killed
    for memory, again and again)."""
    if not worker_needs or not largest_node or worker_needs <= largest_node:
        return
    gib = 2**30
    what = "its weights" + (", their gradients and Adam's two moments" if recipe.method == FULL else "")
    hint = (
        "use LoRA (method lora or qlora), a smaller base model, or a node with more memory"
        if recipe.method == FULL
        else "use a smaller base model, or add a node with more memory"
    )
    raise JobFailed(
        f"the job can never start: each of its workers needs at least {worker_needs / gib:.1f} GiB of memory for {recipe.base_model} "
        f"({what}, in float32), and the Ray cluster's largest node has {largest_node / gib:.1f} GiB for tasks: {hint}",
        user_error=True,
    )


class RoomWatch:
    """Watches whether the Ray cluster as a whole still has the room a
    running phase needs at once. A node that leaves mid-run (a lost machine,
    a pod rescheduled) can take it away: Ray Train then waits for the room to
    start the run's workers again, and would wait without a word."""

    def __init__(self, needs: dict[str, float], every: float = ROOM_CHECK_SECONDS):
        self.needs, self.every = needs, every
        self.checked = time.monotonic()
        self.short = False

    def check(self) -> str:
        """What changed since the last check, in words for the job's events ('' for nothing)."""
        import ray

        if not self.needs or time.monotonic() - self.checked < self.every:
            return ""
        self.checked = time.monotonic()
        short = shortfall(self.needs, ray.cluster_resources())
        if bool(short) == self.short:
            return ""
        self.short = bool(short)
        if not short:
            return "the Ray cluster has the room for this job again: it goes on (training from its latest checkpoint)"
        what = describe_shortfall(short, "the cluster has {:g} in all now")
        return (
            f"the Ray cluster no longer has the room for this job, which needs {what} at once: a node has most likely left. "
            "The job waits for the room to come back (a node restarted or added), then goes on (training from its latest checkpoint); "
            "cancel it to stop waiting"
        )


class _Phases:
    """One job's phases, with what they share: the progress and control
    queues, the events relayed, and each run's validation history."""

    def __init__(self, artifacts: ArtifactStore, recipe: RecipeConfig, emit: EmitEvent, cancel: asyncio.Event, progress, control):
        from tunewire.services.training.search import TrialEvents

        self.artifacts = artifacts
        self.recipe = recipe  # as the job set it, before the base model is measured
        self.job_id = recipe.job_id
        self.emit, self.cancel = emit, cancel
        self.progress, self.control = progress, control
        self.trial_events = TrialEvents()
        self.stop = threading.Event()  # the search's: set on cancel
        self.history: dict[str, list[dict]] = {}
        self.stopped_early: dict[str, bool] = {}
        # Search trials whose training the search's time ended: their epoch reached.
        self.ended_by_time: dict[str, float] = {}
        self.outcomes: dict[str, dict] = {}  # each run's typed result (recipe.finish)

    def close(self) -> None:
        for queue in (self.progress, self.control):
            with contextlib.suppress(Exception):
                queue.shutdown()

    async def _relaying(self, blocking: Callable, needs: dict[str, float], on_cancel: Callable[[], None] | None = None):
        """Runs `blocking` in a thread and relays progress while it runs;
        a cancellation reaches the workers (and the search) at once. `needs`
        (what the phase holds of the cluster at once) is watched against the
        cluster's room (RoomWatch)."""
        done = asyncio.create_task(asyncio.to_thread(blocking))
        room = RoomWatch(needs)

        def stop_workers() -> None:
            if not self.stop.is_set():
                self.stop.set()
                self.control.put("cancel")
                if on_cancel:
                    on_cancel()

        try:
            while not done.done():
                if self.cancel.is_set():
                    stop_workers()
                await self._relay(timeout=0.5)
                if message := room.check():
                    await self.emit("log", {"message": message})
            await self._relay(timeout=0)
            return done.result()
        except asyncio.CancelledError:
            # This orchestrator stops running the job (it is shutting down, or
            # lost the job's lease to another replica): its workers stop too,
            # rather than train on beside the new owner's. The phase is given
            # a moment to wind down (the workers stop at their next step), so
            # what it leaves on storage is whole for the run that resumes it.
            stop_workers()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(done), STOP_WAIT_SECONDS)
            raise
        except (JobFailed, JobCancelled):
            raise
        except Exception as exc:  # Ray wraps the worker's exception
            if self.cancel.is_set():
                raise JobCancelled() from exc
            # The job's error names the innermost cause; the log keeps where it came from.
            log.warning("job %s failed in Ray", self.job_id, exc_info=True)
            raise _system_failure(exc) from exc

    async def _relay(self, timeout: float) -> None:
        """Moves everything queued by the workers and the search into job events."""
        from ray.util.queue import Empty

        for data in self.trial_events.drain():
            self.stopped_early[data["run"]] = data.get("stopped_early", False)
            await self.emit("trial", data)
        while True:
            try:
                item = await self.progress.get_async(block=timeout > 0, timeout=timeout or None)
            except Empty:
                return
            kind, data = item["kind"], item["data"]
            if kind == "result":
                self.outcomes[data["run"]] = data
                continue
            if kind == "eval":
                self.history.setdefault(data["run"], []).append(
                    {k: data.get(k) for k in ("step", "loss", "general_kept", "within_forgetting_budget")}
                )
            await self.emit(kind, data)
            timeout = 0

    async def _say_if_waiting(self, needs: dict[str, float]) -> None:
        """An event when the cluster has less free than the phase about to
        start needs: it waits for other work to release it."""
        import ray

        short = shortfall(needs, ray.available_resources())
        if short:  # a phase that just ended may not have released its share yet
            await asyncio.sleep(WAITING_RECHECK_SECONDS)
            short = shortfall(needs, ray.available_resources())
        if short:
            what = describe_shortfall(short, "{:g} free now")
            await self.emit(
                "log", {"message": f"waiting for {what}: other work holds the rest of the Ray cluster; the job goes on when it is released"}
            )

    async def _task(self, function, *args):
        """`function(*args)` as a Ray task with a worker's resources."""
        import ray

        needs = task_needs(args[0])
        await self._say_if_waiting(needs)
        ref = ray.remote(num_cpus=needs["CPU"], num_gpus=needs.get("GPU", 0), max_retries=1)(function).remote(*args)
        result = await self._relaying(lambda: ray.get(ref), needs, on_cancel=lambda: ray.cancel(ref, force=True))
        if self.cancel.is_set():
            raise JobCancelled()
        if isinstance(result, dict) and result.get("user_error"):
            raise JobFailed(result["user_error"], user_error=True)
        return result

    async def measure_base(self) -> dict:
        """The base model's measurements: from the job's directory when an
        earlier attempt made them, else made now."""
        from tunewire.services.training.recipe import measure_base

        parts = layout.job_parts(self.job_id, layout.BASE_DIR)
        if self.artifacts.exists(*parts):
            return json.loads(read_text(self.artifacts.uri(*parts, layout.BASE_FILE)))
        await self.emit("log", {"message": "measuring the base model: test split, reference text and general probe"})
        base = await self._task(measure_base, self.recipe)
        with self.artifacts.staged_dir() as staged:
            (staged / layout.BASE_FILE).write_text(json.dumps(base))
            self.artifacts.publish_dir(staged, *parts)
        if "probe" in base:
            correct = base["probe"]["correct"]
            await self.emit(
                "log",
                {
                    "message": f"base model: {sum(correct)} of {len(correct)} general questions right, reference perplexity {base['reference_perplexity']:.2f}"
                },
            )
        return base

    async def train(self, recipe: RecipeConfig) -> list[dict]:
        """The job's one training run."""
        earlier = list_checkpoints(self.artifacts, self.job_id, recipe.run)
        how = f"resuming from the checkpoint of step {earlier[-1]['step']}" if earlier else "from the start"
        await self.emit("log", {"message": f"starting Ray Train ({how}): {recipe.num_workers} worker(s), {recipe.total_steps} steps"})
        needs = run_needs(recipe)
        await self._say_if_waiting(needs)
        trainer = make_trainer(recipe, self.progress, self.control)
        result = await self._relaying(trainer.fit, needs)
        outcome = self.outcomes.get(recipe.run, {})
        if outcome.get("user_error"):
            raise JobFailed(outcome["user_error"], user_error=True)
        if result.error is not None:
            raise _system_failure(result.error)
        if self.cancel.is_set() or outcome.get("cancelled"):
            raise JobCancelled()
        self.stopped_early[recipe.run] = bool(outcome.get("stopped_early"))
        return []

    async def search(self, recipe: RecipeConfig, plan, room: int) -> list[dict]:
        """The job's search, as Ray Tune trials; their summaries."""
        from tunewire.services.training.search import run_search, trial_config, trial_name

        concurrent = plan.max_concurrent_trials or room
        described = ", ".join(
            f"{trial_name(i)}: learning rate {trial_config(recipe, plan, trial_name(i)).training.learning_rate:g}"
            + (f", rank {c['lora_rank']}" if "lora_rank" in c else "")
            for i, c in enumerate(plan.candidates)
        )
        budget = (
            f"within {plan.max_seconds} s"
            if plan.time_bounds_first_trial
            else f"the first through all its epochs, the others started while the search's {plan.max_seconds} s last"
        )
        await self.emit("log", {"message": f"searching {len(plan.candidates)} trials ({described}), {concurrent} at a time, {budget}"})
        needs = run_needs(recipe)  # a trial's
        await self._say_if_waiting(needs)
        trainer = functools.partial(make_trainer, progress=self.progress, control=self.control)
        summaries, user_error = await self._relaying(
            lambda: run_search(recipe, plan, trainer, concurrent, self.trial_events, self.stop), needs
        )
        if self.cancel.is_set():
            raise JobCancelled()
        if user_error:
            raise JobFailed(user_error, user_error=True)
        if summaries and all(s["state"] == "FAILED" for s in summaries):
            raise JobFailed(f"every trial of the search failed; the first: {summaries[0]['error']}")
        for summary in summaries:
            self.stopped_early[summary["run"]] = summary.get("stopped_early", False)
            if summary.get("out_of_time"):
                self.ended_by_time[summary["run"]] = summary["epoch"]
        return summaries

    async def evaluate_and_publish(self, recipe: RecipeConfig, plan, trials: list[dict], base: dict, final: tuple[str, ...]) -> None:
        """Chooses the best checkpoint of every run, evaluates it and writes
        the directory to publish."""
        from tunewire.services.training.recipe import evaluate_and_publish
        from tunewire.services.training.search import trial_config

        found = list_checkpoints(self.artifacts, self.job_id)
        if not found:
            raise JobFailed("training finished without a checkpoint: no validation ran (the job may have been cut short)")
        chosen = min(found, key=lambda c: (c["selection_score"], -c["step"]))
        run = chosen["run"]
        config = trial_config(recipe, plan, run) if plan is not None else recipe
        history = _merged(self.history.get(run, []), json.loads(read_text(f"{chosen['uri']}/{layout.STATE_FILE}")).get("history", []))
        cut_by_time = (self.ended_by_time[run], config.training.epochs, plan.max_seconds) if run in self.ended_by_time else None
        found_here = [
            diagnostics.underfitting(history, self.stopped_early.get(run, False), cut_by_time),
            diagnostics.overfitting(history, chosen["step"]),
        ]
        extras = {
            "best_step": chosen["step"],
            "best_validation_loss": chosen["validation_loss"],
            **_answer_recall(chosen),
            "stopped_early": self.stopped_early.get(run, False),
            "run": run,
            "learning_rate": config.training.learning_rate,
            "lora_rank": config.training.lora_rank,
            "trials": [t | _best_of(found, t["run"]) for t in trials],
            "diagnostics": [d for d in found_here if d],
        }
        within = "within" if chosen["within_budget"] else "over"
        await self.emit(
            "log",
            {
                "message": f"chose {run}, step {chosen['step']} (validation loss {chosen['validation_loss']:.4f}{_recall_words(chosen)}, {within} the forgetting budget): evaluating it"
            },
        )
        await self._task(evaluate_and_publish, config, chosen["uri"], base, extras, final)
        report = json.loads(read_text(self.artifacts.uri(*final, layout.EVALUATION_FILE)))
        for diagnostic in report.get("diagnostics", []):
            await self.emit("diagnostic", diagnostic)
        await self.emit("evaluation", report)


def _recall_words(checkpoint: dict) -> str:
    recall = checkpoint.get("answer_recall")
    return f", answers holding {recall:.0%} of the reference answers' words" if recall is not None else ""


def _merged(*histories: list[dict]) -> list[dict]:
    """Validation records by step, the first history's where both have one."""
    by_step: dict[int, dict] = {}
    for history in reversed(histories):
        by_step |= {h["step"]: h for h in history}
    return [by_step[s] for s in sorted(by_step)]


def _best_of(checkpoints: list[dict], run: str) -> dict:
    """A run's best checkpoint, as the trial table shows it."""
    mine = [c for c in checkpoints if c["run"] == run]
    if not mine:
        return {"best_validation_loss": 0.0, "general_kept": 0.0, "within_forgetting_budget": False, "best_step": 0}
    best = min(mine, key=lambda c: c["selection_score"])
    forgetting = best.get("forgetting") or {}
    kept = forgetting.get("kept", 0) / forgetting["base_correct"] if forgetting.get("base_correct") else 1.0
    return {
        "best_validation_loss": best["validation_loss"],
        "general_kept": kept,
        "within_forgetting_budget": best["within_budget"],
        "best_step": best["step"],
    } | _answer_recall(best)


def _answer_recall(checkpoint: dict) -> dict:
    """A checkpoint's answer recall, for a report, where it was measured."""
    recall = checkpoint.get("answer_recall")
    return {"best_answer_recall": recall} if recall is not None else {}


def make_trainer(config: RecipeConfig, progress, control, callbacks: list | None = None):
    """One run's TorchTrainer: its workers, data shards, checkpoints (the
    best `keep_checkpoints` by selection score) and failure handling (a worker
    that dies is replaced and the run resumes from its latest checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tunewire.services.training.recipe import train_worker

    artifacts = ArtifactStore(config.artifact_root)
    job_dir = artifacts.path(*layout.job_parts(config.job_id))
    attempt = 1 + len([p for p in artifacts.fs.glob(f"{job_dir}/{config.run}.*") if artifacts.fs.isdir(p)])
    # Small splits are read by the workers themselves (recipe.MAX_CACHED_ROWS).
    splits = ["train"] + (["validation"] if config.has_validation else [])
    datasets = {split: _split(config.dataset_uri, split) for split in splits if not config.kept_in_memory(split)}
    return TorchTrainer(
        train_worker,
        train_loop_config={"recipe": config, "progress": progress, "control": control},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        datasets=datasets or None,
        run_config=RunConfig(
            name=layout.run_name(config.run, attempt),
            storage_path=artifacts.uri(*layout.job_parts(config.job_id)),
            callbacks=[*(callbacks or []), cancel_check(control)],
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.training.keep_checkpoints,
                checkpoint_score_attribute="selection_score",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=2),
        ),
    )


def cancel_check(control):
    """A Ray Train callback its controller runs before each try to start the
    run's workers: where the job is cancelled (the control queue holds the
    cancel), the run ends there. Workers that never started read no control
    queue, and a run that waits for the cluster's room tries again every
    WORKER_GROUP_START_TIMEOUT_SECONDS, each try's placement group let go."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class CancelCheck(WorkerGroupCallback):
        def before_worker_group_start(self, worker_group_context) -> None:
            if control.qsize():
                import ray

                # The controller lets an actor exit through (nothing retries it);
                # fit() then raises, and the phase ends as cancelled.
                ray.actor.exit_actor()

    return CancelCheck()


def _split(uri: str, split: str):
    import pyarrow.compute as pc
    import ray.data

    return ray.data.read_parquet(uri).map_batches(lambda table: table.filter(pc.equal(table["split"], split)), batch_format="pyarrow")


def _system_failure(exc: BaseException) -> JobFailed:
    """A JobFailed naming the innermost cause of Ray's wrapped exception."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    cause = chain[-1]
    lines = str(cause).strip().splitlines()
    return JobFailed(f"{type(cause).__name__}: {lines[-1] if lines else ''}")
