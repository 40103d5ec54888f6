"""A hyperparameter search as Ray Tune trials of the training recipe.

Each trial is one Ray Train run of `recipe.train_worker` with one candidate's
hyperparameters (a Tune function trainable that drives a TorchTrainer, as Ray
Train V2 pairs them). The workers' reports reach Tune through
`TuneReportCallback`; the ASHA scheduler stops a trial whose objective (its
best validation score so far: what its answers to validation prompts miss,
then the loss; `recipe.validation_score`) trails the others' at the same epoch. Tune's experiment
state lives beside the job's checkpoints, so a search whose orchestrator
crashed is restored where it stopped: finished trials stay finished and the
others resume from their latest checkpoints. A search stopped on purpose (a
cancel, the orchestrator stopping) leaves only the trials' checkpoints.

The trials' lifecycle (started, its latest evaluation, finished, stopped,
failed) is handed to the orchestrator as `trial` events.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field

from ray import tune
from ray.tune.stopper import Stopper

from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.layout import TUNE_DIR, job_parts
from tunewire.services.training.config import SearchPlan, TrainingConfig
from tunewire.services.training.recipe import RecipeConfig

# Trials run at least this many epochs before the scheduler may stop them.
GRACE_EPOCHS = 2
# A trial needs the time to get through its first comparison and this share
# of its epochs: one squeezed into the search's last minute or two cannot
# win, only make the job wait (80 s of the demo's at 10 epochs). One started
# with a third of the time left after the first stopped early can: it won on
# one fact set.
MIN_SCHEDULE_SHARE = 0.25
NOT_STARTED = "not started: the search's time ran out first"
REDUCTION_FACTOR = 2


def trial_name(index: int) -> str:
    return f"trial-{index + 1}"


def unbounded_run(plan: SearchPlan) -> str:
    """The trial no time bounds ("" for none): the first, when the search's
    time is the default."""
    return "" if plan.time_bounds_first_trial else trial_name(0)


def finishing_seconds(max_seconds: float) -> float:
    """How long past the search's time Tune lets its trials run: they end
    their training a validation's length before it, and this is the margin
    for a validation slower than the one before."""
    return max(60.0, min(0.1 * max_seconds, 600.0))


def trial_config(recipe: RecipeConfig, plan: SearchPlan, run: str) -> RecipeConfig:
    """The recipe of one trial: the job's config with its candidate's values."""
    index = int(run.rsplit("-", 1)[1]) - 1
    training = TrainingConfig.from_dict(recipe.training.to_dict() | plan.candidates[index])
    return recipe.replace(run=run, training=training)


def trial_state(result: dict, max_epochs: int, error: bool = False) -> str:
    """How a trial ended, from its last result: the scheduler also stops a
    trial that reached its last epoch, which counts as done."""
    if result.get("user_error") or error:
        return "FAILED"
    if result.get("cancelled"):
        return "CANCELLED"
    if result.get("finished") or result.get("epoch", 0) >= max_epochs:
        return "DONE"
    return "STOPPED"


def scheduler_epochs(recipe: RecipeConfig, plan: SearchPlan) -> tuple[int, int]:
    """(grace, max) epochs for ASHA; validation every N steps reports in epochs too."""
    epochs = max(trial_config(recipe, plan, trial_name(i)).training.epochs for i in range(len(plan.candidates)))
    return min(GRACE_EPOCHS, epochs), epochs


class TrialEvents:
    """Trial events from Tune's driver thread, for the orchestrator's loop to emit."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.ended: set[str] = set()  # runs whose last event went out

    def put(self, data: dict) -> None:
        if data["state"] != "RUNNING":
            self.ended.add(data["run"])
        self._events.put(data)

    def drain(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out


# Tune pickles its callbacks and stopper with the experiment (to restore it
# after a restart), and queues and events do not pickle: those name their
# search by job id and find its channels here, in the process running it.
# (Module-level classes, so pickling refers to them rather than copying them
# with this table.)
@dataclass
class _Channels:
    events: TrialEvents
    cancel: threading.Event
    # Trial ids started and not ended, with when each started: Tune starts
    # the next trial as one ends, so whether a trial was worth starting is
    # judged from the time left at its start.
    running: dict[str, float] = field(default_factory=dict)
    # Trial ids with no time bound (the first, under the default time): always worth running.
    unbounded: set[str] = field(default_factory=set)
    # As Tune's time budget, counted from this run of the search (a restored one starts again).
    started: float = field(default_factory=time.monotonic)


_CHANNELS: dict[str, _Channels] = {}


class ReportTrials(tune.Callback):
    """Trial lifecycle as `trial` events (run, state, hyperparameters, progress)."""

    def __init__(self, job_id: str, max_epochs: int, unbounded_run: str = ""):
        self.job_id = job_id
        self.max_epochs = max_epochs
        self.unbounded_run = unbounded_run

    def _event(self, trial, state: str, message: str = "") -> None:
        channels = _CHANNELS.get(self.job_id)
        if channels is None:
            return
        candidate = trial.config["candidate"]
        result = trial.last_result or {}
        objective = result.get("objective", math.inf)
        channels.events.put(
            {
                "run": candidate["run"],
                "state": state,
                "learning_rate": candidate["learning_rate"],
                "lora_rank": candidate["lora_rank"],
                "epoch": float(result.get("epoch", 0.0)),
                "step": int(result.get("step", 0)),
                "best_objective": objective if math.isfinite(objective) else 0.0,
                "best_validation_loss": float(result.get("best_validation_loss", 0.0)),
                **_recall(result.get("best_answer_recall")),
                "message": message,
            }
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        channels = _CHANNELS.get(self.job_id)
        if channels is not None:
            channels.running[trial.trial_id] = time.monotonic()
            if trial.config["candidate"]["run"] == self.unbounded_run:
                channels.unbounded.add(trial.trial_id)
        self._event(trial, "RUNNING")

    def _ended(self, trial) -> None:
        if self.job_id in _CHANNELS:
            _CHANNELS[self.job_id].running.pop(trial.trial_id, None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "objective" in result:
            self._event(trial, "RUNNING")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)
        result = trial.last_result or {}
        state = trial_state(result, self.max_epochs)
        messages = {
            "FAILED": result.get("user_error", ""),
            "DONE": "stopped early: no better checkpoint for a while"
            if result.get("stopped_early")
            else "its training ended at the search's time, its learning rate decayed to it"
            if result.get("out_of_time")
            else "",
            "STOPPED": "stopped by the scheduler: it trailed the other trials, or the search ran out of time",
        }
        self._event(trial, state, messages.get(state, ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)
        self._event(trial, "FAILED", "the trial failed; the orchestrator's log has the error")

    def on_experiment_end(self, trials, **info):
        # The search's time budget ends running trials (Tune marks them
        # terminated) without a completion callback, and StopSearch ends
        # those it does not start, or started too late to be worth running.
        channels = _CHANNELS.get(self.job_id)
        if channels is None:  # nowhere to report to
            return
        running = set(channels.running)
        for trial in trials:
            if trial.config["candidate"]["run"] in channels.events.ended:
                continue
            if trial.last_result and trial.trial_id in running:
                self.on_trial_complete(0, trials, trial)
            elif not trial.last_result and trial.status != "ERROR":
                self._ended(trial)
                self._event(trial, "STOPPED", NOT_STARTED)


class StopSearch(Stopper):
    """Ends a trial that reports a user error (every trial would hit it), and
    the whole search once its job is cancelled, or when no trial worth
    running is running and the next would not be. A trial is worth running
    when the time left at its start took it through its first comparison
    (the scheduler's grace epochs) and MIN_SCHEDULE_SHARE of its epochs, at
    the pace the first trial took to its first comparison: one the time
    budget would cut before then is wasted time. A trial with no time bound
    (the first, under the default time) is always worth running."""

    def __init__(self, job_id: str, max_seconds: float, grace_epochs: int, max_epochs: int):
        self.job_id = job_id
        self.max_seconds = max_seconds
        self.grace_epochs = grace_epochs
        self.needed_epochs = max(grace_epochs, MIN_SCHEDULE_SHARE * max_epochs)
        self.epoch_seconds: float | None = None

    def __call__(self, trial_id, result) -> bool:
        epoch = result.get("epoch", 0)
        if self.epoch_seconds is None and epoch >= self.grace_epochs:
            self.epoch_seconds = float(result.get("time_total_s", 0.0)) / epoch
        return bool(result.get("user_error")) or self.stop_all()

    def stop_all(self) -> bool:
        channels = _CHANNELS.get(self.job_id)
        if channels is None:
            return False
        ends = channels.started + self.max_seconds
        worth_running = [
            began for trial_id, began in channels.running.items() if trial_id in channels.unbounded or not self._too_short(ends - began)
        ]
        return (not worth_running and self._too_short(ends - time.monotonic())) or channels.cancel.is_set()

    def _too_short(self, seconds_left: float) -> bool:
        needed = 0.0 if self.epoch_seconds is None else self.epoch_seconds * self.needed_epochs
        return seconds_left <= needed


def run_search(
    recipe: RecipeConfig,
    plan: SearchPlan,
    make_trainer,
    concurrent: int,
    events: TrialEvents,
    stop: threading.Event,
) -> tuple[list[dict], str | None]:
    """Runs (or, from saved state, resumes) the search's trials; blocks until
    they end. `make_trainer(config, callbacks)` builds one run's TorchTrainer
    (picklable: trials run in their own actors). Returns each trial's
    summary, and the user error a trial reported, if any."""
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler

    # Trials fit their schedules to the search's time and end their training
    # by it (recipe.learning_rate_factor); Tune's own budget, a little later,
    # lets the last validation finish and stops anything left. Under the
    # default time the first trial trains its whole schedule, and no time
    # stops it: the time decides only whether later trials start.
    finish_by = time.time() + plan.max_seconds
    unbounded = unbounded_run(plan)

    def run_trial(config: dict) -> None:
        run = config["candidate"]["run"]
        bounded = run != unbounded
        if bounded and time.time() >= finish_by:  # started as another trial finished: no time to train
            return
        trial = trial_config(recipe.replace(finish_by=finish_by if bounded else 0.0), plan, run)
        make_trainer(trial, callbacks=[TuneReportCallback()]).fit()

    runs = [trial_name(i) for i in range(len(plan.candidates))]
    candidates = [
        {
            "run": run,
            "learning_rate": trial_config(recipe, plan, run).training.learning_rate,
            "lora_rank": trial_config(recipe, plan, run).training.lora_rank,
        }
        for run in runs
    ]
    # A trial's driver does no work itself: its TorchTrainer asks for the workers.
    trainable = tune.with_resources(run_trial, {"CPU": 0.01})
    artifacts = ArtifactStore(recipe.artifact_root)
    storage_path = artifacts.uri(*job_parts(recipe.job_id))  # beside the job's checkpoints
    path = f"{storage_path}/{TUNE_DIR}"
    _CHANNELS[recipe.job_id] = _Channels(events, stop)
    try:
        if tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            grace, max_epochs = scheduler_epochs(recipe, plan)
            tuner = tune.Tuner(
                trainable,
                param_space={"candidate": tune.grid_search(candidates)},
                tune_config=tune.TuneConfig(
                    metric="objective",
                    mode="min",
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace, reduction_factor=REDUCTION_FACTOR),
                    max_concurrent_trials=concurrent,
                    time_budget_s=None if unbounded else plan.max_seconds + finishing_seconds(plan.max_seconds),
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    storage_path=storage_path,
                    stop=StopSearch(recipe.job_id, plan.max_seconds, grace, max_epochs),
                    callbacks=[ReportTrials(recipe.job_id, max_epochs, unbounded)],
                    verbose=0,
                    failure_config=tune.FailureConfig(max_failures=1),
                ),
            )
        results = tuner.fit()
        if stop.is_set():
            # Tune records the trials it stopped (a cancel, or the orchestrator
            # stopping) as terminated, and a restored experiment would never
            # run them again. Their own checkpoints hold what a later run of
            # the job needs: it starts a fresh experiment whose trials resume
            # from them. (After a crash Tune's state is kept: its trials are
            # still running there, and restore resumes them.)
            artifacts.delete(*job_parts(recipe.job_id), TUNE_DIR)
    finally:
        _CHANNELS.pop(recipe.job_id, None)
    return summarize_trials(results, candidates, scheduler_epochs(recipe, plan)[1], events, add_unstarted=not stop.is_set())


def summarize_trials(
    results, candidates: list[dict], max_epochs: int, events: TrialEvents, add_unstarted: bool
) -> tuple[list[dict], str | None]:
    """Each trial's summary from Tune's results, and the user error a trial
    reported, if any. A trial that never reported (Tune made it, then the
    search's time ran out) has no config in its result; it is summarised,
    with the candidates Tune never made into trials, as not started."""
    summaries, user_error = [], None
    for result in results:
        if result.config is None:
            continue
        candidate, metrics = result.config["candidate"], result.metrics or {}
        user_error = user_error or metrics.get("user_error")
        state = trial_state(metrics, max_epochs, error=result.error is not None)
        summaries.append(
            {
                "run": candidate["run"],
                "learning_rate": candidate["learning_rate"],
                "lora_rank": candidate["lora_rank"],
                "state": state,
                "epoch": float(metrics.get("epoch", 0.0)),
                "stopped_early": bool(metrics.get("stopped_early")),
                "out_of_time": bool(metrics.get("out_of_time")),
                "error": _innermost(result.error) if result.error else "",
            }
        )
    ran = {s["run"] for s in summaries}
    for candidate in candidates:
        if candidate["run"] not in ran and add_unstarted and not user_error:
            summaries.append(candidate | {"state": "STOPPED", "epoch": 0.0, "stopped_early": False, "out_of_time": False, "error": ""})
            if candidate["run"] not in events.ended:  # ReportTrials ends those Tune made
                events.put(candidate | {"state": "STOPPED", "epoch": 0.0, "step": 0, "best_objective": 0.0, "message": NOT_STARTED})
    return sorted(summaries, key=lambda s: s["run"]), user_error


def _recall(value) -> dict:
    """The best answer recall for a trial event, where one was measured."""
    return {"best_answer_recall": float(value)} if value is not None and value >= 0 else {}


def _innermost(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
