"""Jobs, their events and published adapters, in SQL (SQLite by default).

A job is a row before it is anything else; every state change is written in
the same transaction as the event that announces it, so a stream that reads
events never misses the final one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text, func, or_, select, update
from sqlalchemy import false as sa_false
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tunewire.services.common.db import exclusive, make_engine, migrate

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Column widths a request's strings are checked against before they are stored.
IDEMPOTENCY_KEY_LENGTH = 256  # the project, '/', the caller's key
MODEL_NAME_LENGTH = 512
# The lock that orders adapter publications and deletions.
ADAPTER_CHANGES = "adapter changes"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo:
        return value
    return value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The project (tenant) the job and its adapter belong to.
    project: Mapped[str] = mapped_column(String(63), index=True, default="default")
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    config: Mapped[dict] = mapped_column(JSON)
    dataset: Mapped[dict] = mapped_column(JSON)
    error: Mapped[str] = mapped_column(Text, default="")
    adapter_id: Mapped[str] = mapped_column(String(64), default="")
    latest_step: Mapped[dict] = mapped_column(JSON, default=dict)
    evaluation: Mapped[dict] = mapped_column(JSON, default=dict)
    # A retried CreateJob with the same key finds this job.
    idempotency_key: Mapped[str | None] = mapped_column(String(IDEMPOTENCY_KEY_LENGTH), unique=True, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The orchestrator replica running the job, until lease_expires_at; it
    # renews the lease while it runs, and another replica takes the job over
    # once it lapses (the holder died).
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A cancellation of a running job, for whichever replica runs it.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The job's pin on its dataset has been released (it ended, and the
    # dataset service was told): until then the dataset cannot be deleted.
    dataset_released: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # The sequence number of the job's latest event: taken by an atomic
    # increment, so replicas writing one job's events at once never collide.
    last_event_sequence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The job's files in the artifact store (checkpoints, a search's state)
    # have been removed: it ended, and its adapter holds what it made.
    files_removed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())


class EventRecord(Base):
    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON)


class AdapterRecord(Base):
    __tablename__ = "adapters"

    sequence: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(String(63), index=True, default="default")
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    base_model: Mapped[str] = mapped_column(String(MODEL_NAME_LENGTH))
    uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    # Published but not hot-loaded: no checkpoint stayed within the job's forgetting budget.
    held_back: Mapped[bool] = mapped_column(Boolean, default=False)
    # The order of the adapter's latest change (publication, then deletion):
    # WatchAdapters resumes after it. A deleted adapter's row stays, so a
    # watcher that was away still learns of the deletion.
    changed: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), index=True, default=0)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # Bytes of its files, counted against the project's quota while it is not deleted.
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    spec: dict
    config: dict
    dataset: dict
    error: str = ""
    adapter_id: str = ""
    latest_step: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    project: str = "default"

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_record(cls, r: JobRecord) -> Job:
        return cls(
            id=r.id,
            state=r.state,
            spec=dict(r.spec),
            config=dict(r.config),
            dataset=dict(r.dataset),
            error=r.error or "",
            adapter_id=r.adapter_id or "",
            latest_step=dict(r.latest_step or {}),
            evaluation=dict(r.evaluation or {}),
            created_at=_utc(r.created_at),
            started_at=_utc(r.started_at),
            ended_at=_utc(r.ended_at),
            project=r.project,
        )


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    sequence: int
    time: dt.datetime
    kind: str  # "state" | "step" | "eval" | "checkpoint" | "evaluation" | "trial" | "diagnostic" | "log"
    data: dict


@dataclass(frozen=True)
class Adapter:
    id: str
    job_id: str
    base_model: str
    uri: str
    created_at: dt.datetime
    sequence: int
    project: str = "default"
    held_back: bool = False
    deleted: bool = False
    size_bytes: int = 0

    @classmethod
    def from_record(cls, r: AdapterRecord) -> Adapter:
        return cls(
            r.id, r.job_id, r.base_model, r.uri, _utc(r.created_at), r.changed, r.project, bool(r.held_back), bool(r.deleted), r.size_bytes
        )


class JobStore:
    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        migrate(self.engine, "training", first_table="jobs")

    def close(self) -> None:
        self.engine.dispose()

    # Jobs

    def create(
        self, job_id: str, spec: dict, config: dict, dataset: dict, idempotency_key: str = "", project: str = "default"
    ) -> tuple[Job, bool]:
        """The new job, or the one created earlier with the same key; and
        whether it was created now."""
        try:
            with Session(self.engine) as session, session.begin():
                record = JobRecord(
                    id=job_id,
                    project=project,
                    state=QUEUED,
                    spec=spec,
                    config=config,
                    dataset=dataset,
                    idempotency_key=idempotency_key or None,
                    created_at=_now(),
                )
                session.add(record)
                session.flush()
                self._append(session, job_id, "state", {"state": QUEUED})
                return Job.from_record(record), True
        except IntegrityError:
            existing = self.by_idempotency_key(idempotency_key)
            if existing is None:
                raise
            return existing, False

    def by_idempotency_key(self, key: str) -> Job | None:
        if not key:
            return None
        with Session(self.engine) as session:
            record = session.scalar(select(JobRecord).where(JobRecord.idempotency_key == key))
            return Job.from_record(record) if record else None

    def get(self, job_id: str) -> Job | None:
        with Session(self.engine) as session:
            record = session.get(JobRecord, job_id)
            return Job.from_record(record) if record else None

    def list(self, state: str = "", limit: int | None = None, offset: int = 0, project: str = "") -> list[Job]:
        """Jobs newest first: of one project, or of all ('')."""
        query = select(JobRecord).order_by(JobRecord.created_at.desc(), JobRecord.id.desc()).offset(offset).limit(limit)
        if state:
            query = query.where(JobRecord.state == state)
        if project:
            query = query.where(JobRecord.project == project)
        with Session(self.engine) as session:
            return [Job.from_record(r) for r in session.scalars(query)]

    def count_by_state(self) -> dict[str, int]:
        """Every state's number of jobs (0 for states no job is in)."""
        query = select(JobRecord.state, func.count()).group_by(JobRecord.state)
        with Session(self.engine) as session:
            return {state: 0 for state in (QUEUED, RUNNING, *FINAL_STATES)} | dict(session.execute(query).all())

    def count_active(self, project: str) -> int:
        """The project's queued and running jobs."""
        query = select(func.count()).select_from(JobRecord).where(JobRecord.project == project, JobRecord.state.in_((QUEUED, RUNNING)))
        with Session(self.engine) as session:
            return int(session.scalar(query))

    def unreleased_datasets(self) -> list[Job]:
        """Ended jobs whose dataset pin has not been released yet."""
        with Session(self.engine) as session:
            query = select(JobRecord).where(JobRecord.state.in_(FINAL_STATES), JobRecord.dataset_released.is_(False))
            return [Job.from_record(r) for r in session.scalars(query)]

    def mark_dataset_released(self, job_id: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(dataset_released=True))

    def files_kept(self) -> list[str]:
        """Ended jobs whose files have not been removed yet."""
        with Session(self.engine) as session:
            query = select(JobRecord.id).where(JobRecord.state.in_(FINAL_STATES), JobRecord.files_removed.is_(False))
            return list(session.scalars(query))

    def mark_files_removed(self, job_id: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(files_removed=True))

    def transition(
        self,
        job_id: str,
        state: str,
        *,
        from_states: tuple[str, ...],
        error: str = "",
        adapter_id: str = "",
        owner: str = "",
        lease_seconds: float = 0.0,
    ) -> bool:
        """Moves the job to `state` if it is in one of from_states, with its
        event, atomically. False if the job was elsewhere (say, cancelled).
        With an owner, a RUNNING job moves only if that owner holds it, and a
        move to RUNNING gives the owner the lease."""
        values: dict = {"state": state}
        if state == RUNNING:
            values |= {"started_at": _now(), "lease_owner": owner, "lease_expires_at": _now() + dt.timedelta(seconds=lease_seconds)}
        else:
            values |= {"lease_owner": "", "lease_expires_at": None}
        if state in FINAL_STATES:
            values["ended_at"] = _now()
        if error:
            values["error"] = error
        if adapter_id:
            values["adapter_id"] = adapter_id
        condition = [JobRecord.id == job_id, JobRecord.state.in_(from_states)]
        if owner:
            condition.append(or_(JobRecord.state != RUNNING, JobRecord.lease_owner == owner))
        with Session(self.engine) as session, session.begin():
            result = session.execute(update(JobRecord).where(*condition).values(**values))
            if result.rowcount != 1:
                return False
            data = {"state": state}
            if error:
                data["error"] = error
            self._append(session, job_id, "state", data)
            return True

    # Events

    def append_event(self, job_id: str, kind: str, data: dict) -> JobEvent:
        with Session(self.engine) as session, session.begin():
            if kind == "step":
                session.execute(update(JobRecord).where(JobRecord.id == job_id).values(latest_step=data))
            if kind == "evaluation":
                session.execute(update(JobRecord).where(JobRecord.id == job_id).values(evaluation=data))
            return self._append(session, job_id, kind, data)

    def _append(self, session: Session, job_id: str, kind: str, data: dict) -> JobEvent:
        # The increment locks the job's row until the transaction ends (a
        # read of max(sequence) would let two writers take the same number).
        sequence = session.execute(
            update(JobRecord)
            .where(JobRecord.id == job_id)
            .values(last_event_sequence=JobRecord.last_event_sequence + 1)
            .returning(JobRecord.last_event_sequence)
        ).scalar_one()
        event = EventRecord(job_id=job_id, sequence=sequence, time=_now(), kind=kind, data=data)
        session.add(event)
        return JobEvent(job_id, event.sequence, event.time, kind, data)

    def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        query = (
            select(EventRecord).where(EventRecord.job_id == job_id, EventRecord.sequence > after_sequence).order_by(EventRecord.sequence)
        )
        with Session(self.engine) as session:
            return [JobEvent(e.job_id, e.sequence, _utc(e.time), e.kind, dict(e.data)) for e in session.scalars(query)]

    # Adapters

    def publish_adapter(
        self, job_id: str, adapter_id: str, base_model: str, uri: str, owner: str = "", held_back: bool = False, size_bytes: int = 0
    ) -> Adapter | None:
        """Records the adapter and marks the job SUCCEEDED in one transaction;
        None if the job left RUNNING meanwhile (cancelled), or its lease
        passed to another owner."""
        condition = [JobRecord.id == job_id, JobRecord.state == RUNNING]
        if owner:
            condition.append(JobRecord.lease_owner == owner)
        with exclusive(self.engine, ADAPTER_CHANGES), Session(self.engine) as session, session.begin():
            result = session.execute(
                update(JobRecord)
                .where(*condition)
                .values(state=SUCCEEDED, ended_at=_now(), adapter_id=adapter_id, lease_owner="", lease_expires_at=None)
            )
            if result.rowcount != 1:
                return None
            project = session.scalar(select(JobRecord.project).where(JobRecord.id == job_id))
            record = AdapterRecord(
                id=adapter_id,
                project=project,
                job_id=job_id,
                base_model=base_model,
                uri=uri,
                created_at=_now(),
                held_back=held_back,
                changed=self._next_change(session),
                size_bytes=size_bytes,
            )
            session.add(record)
            session.flush()
            self._append(session, job_id, "state", {"state": SUCCEEDED, "adapter_id": adapter_id})
            return Adapter.from_record(record)

    @staticmethod
    def _next_change(session: Session) -> int:
        # Under exclusive(ADAPTER_CHANGES): changes commit in the order of
        # their numbers, so a watcher never skips one still being written.
        return int(session.scalar(select(func.coalesce(func.max(AdapterRecord.changed), 0)))) + 1

    def delete_adapter(self, project: str, adapter_id: str) -> Adapter | None:
        """Marks the project's adapter deleted (a change watchers see); None
        if the project has no such adapter, or it is deleted already."""
        with exclusive(self.engine, ADAPTER_CHANGES), Session(self.engine) as session, session.begin():
            live = [AdapterRecord.id == adapter_id, AdapterRecord.project == project, AdapterRecord.deleted.is_(False)]
            record = session.scalars(select(AdapterRecord).where(*live)).one_or_none()
            if record is None:
                return None
            record.deleted, record.changed = True, self._next_change(session)
            session.flush()
            return Adapter.from_record(record)

    def adapters_after(self, after_sequence: int, project: str = "", deleted: bool = True) -> list[Adapter]:
        """Adapters changed after `after_sequence`: of one project, or of all
        (''); with `deleted`, the deleted ones too."""
        query = select(AdapterRecord).where(AdapterRecord.changed > after_sequence).order_by(AdapterRecord.changed)
        if project:
            query = query.where(AdapterRecord.project == project)
        if not deleted:
            query = query.where(AdapterRecord.deleted.is_(False))
        with Session(self.engine) as session:
            return [Adapter.from_record(r) for r in session.scalars(query)]

    def adapter_bytes(self, project: str) -> int:
        """Bytes of the project's adapters that are not deleted."""
        query = select(func.coalesce(func.sum(AdapterRecord.size_bytes), 0)).where(
            AdapterRecord.project == project, AdapterRecord.deleted.is_(False)
        )
        with Session(self.engine) as session:
            return int(session.scalar(query))

    # Leases

    def renew_leases(self, owner: str, job_ids: list[str], lease_seconds: float) -> set[str]:
        """Extends the owner's leases on these running jobs; returns the ones it
        lost: not ended, yet no longer running under its lease (another replica
        requeued or took them). A job that ended meanwhile is not lost."""
        if not job_ids:
            return set()
        held = [JobRecord.id.in_(job_ids), JobRecord.state == RUNNING, JobRecord.lease_owner == owner]
        with Session(self.engine) as session, session.begin():
            session.execute(update(JobRecord).where(*held).values(lease_expires_at=_now() + dt.timedelta(seconds=lease_seconds)))
            not_held = or_(JobRecord.state != RUNNING, JobRecord.lease_owner.is_(None), JobRecord.lease_owner != owner)
            query = select(JobRecord.id).where(JobRecord.id.in_(job_ids), JobRecord.state.not_in(FINAL_STATES), not_held)
            return set(session.scalars(query))

    def request_cancel(self, job_id: str) -> bool:
        """Records a cancellation for the replica running the job."""
        with Session(self.engine) as session, session.begin():
            result = session.execute(
                update(JobRecord).where(JobRecord.id == job_id, JobRecord.state == RUNNING).values(cancel_requested=True)
            )
            return result.rowcount == 1

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(JobRecord.id).where(JobRecord.id.in_(job_ids), JobRecord.cancel_requested)))

    def requeue_lapsed(self, reason: str, owner: str | None = None) -> list[str]:
        """Running jobs whose holder is gone go back to the queue: their lease
        lapsed, or `owner` held them (the caller is that owner, restarted)."""
        lapsed = or_(JobRecord.lease_expires_at.is_(None), JobRecord.lease_expires_at < _now())
        if owner is not None:
            lapsed = or_(lapsed, JobRecord.lease_owner == owner)
        requeued = []
        with Session(self.engine) as session:
            found = session.execute(select(JobRecord.id, JobRecord.cancel_requested).where(JobRecord.state == RUNNING, lapsed)).all()
        for job_id, cancel in found:
            # A job whose cancellation was asked for ends cancelled instead.
            state, ended = (CANCELLED, _now()) if cancel else (QUEUED, None)
            with Session(self.engine) as session, session.begin():
                # Checked again in the update: the holder may have renewed meanwhile.
                moved = session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id, JobRecord.state == RUNNING, lapsed)
                    .values(state=state, ended_at=ended, lease_owner="", lease_expires_at=None)
                )
                if moved.rowcount != 1:
                    continue
                self._append(session, job_id, "state", {"state": state})
                if state == QUEUED:
                    self._append(session, job_id, "log", {"message": reason})
                    requeued.append(job_id)
        return requeued
