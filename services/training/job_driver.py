"""The driver of one job's Ray Job (see `ray_jobs`): runs the job's phases
on the cluster and puts their events, then how they ended, in the attempt's
event log. SIGTERM (`ray job stop`, which a cancel sends) winds the running phase
down as a cancel does.

    python -m tunewire.services.training.job_driver SUBMISSION_ID REQUEST_JSON
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.training.ray_jobs import CANCELLED, FAILED, SUCCEEDED, EventLog
from tunewire.services.training.ray_runner import JobRequest, run_phases
from tunewire.services.training.scheduler import JobCancelled, JobFailed

log = logging.getLogger("tunewire.services.training.job_driver")


async def drive(request: JobRequest, events: EventLog) -> dict:
    """The job's phases, their events put in `events`; how they ended."""
    cancel = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, cancel.set)
    try:
        await run_phases(ArtifactStore(request.recipe.artifact_root), request, events.put, cancel)
        return {"state": SUCCEEDED}
    except JobCancelled:
        return {"state": CANCELLED}
    except JobFailed as exc:
        return {"state": FAILED, "error": str(exc), "user_error": exc.user_error}
    except Exception as exc:  # noqa: BLE001 - the orchestrator must hear of any failure
        log.exception("job %s failed", request.recipe.job_id)
        return {"state": FAILED, "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission_id", help="this attempt's Ray Job id, which names its event log")
    parser.add_argument("request", help="the job's request (JobRequest as JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray
    from ray.data import DataContext

    ray.init(logging_level=logging.WARNING)  # the cluster Ray Jobs started this driver on
    DataContext.get_current().enable_progress_bars = False
    events = EventLog(args.submission_id)

    async def main_async() -> dict:
        try:
            request = JobRequest.from_json(args.request)
        except (ValueError, TypeError, KeyError) as exc:  # not a retry's to mend: the orchestrator is told
            outcome = {
                "state": FAILED,
                "error": f"the job's driver could not read its request ({type(exc).__name__}: {exc}): "
                "run the same tunewire version on the Ray cluster's head as on the orchestrator",
            }
        else:
            log.info("job %s: attempt %s", request.recipe.job_id, args.submission_id)
            outcome = await drive(request, events)
        await events.put("outcome", outcome)
        return outcome

    outcome = asyncio.run(main_async())
    log.info("attempt %s: %s", args.submission_id, outcome)
    return 0 if outcome["state"] == SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
