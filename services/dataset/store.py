"""Dataset metadata in SQL (SQLite by default). Bytes live in the artifact store."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, String, delete, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tunewire.services.common.db import make_engine, migrate

# The widest pin holder a request may name (the column's width).
HOLDER_LENGTH = 256


class Base(DeclarativeBase):
    pass


class DatasetRecord(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The project (tenant) the dataset belongs to; no other project sees it.
    project: Mapped[str] = mapped_column(String(63), index=True, default="default")
    name: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(32))
    row_count: Mapped[int] = mapped_column(BigInteger)
    split_row_counts: Mapped[dict] = mapped_column(JSON)
    labels: Mapped[list] = mapped_column(JSON, default=list)
    uri: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    report: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class NameRecord(Base):
    """A name points at its versions; one version may carry several names."""

    __tablename__ = "dataset_names"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class PinRecord(Base):
    """A holder (a training job) using the dataset: it cannot be deleted meanwhile."""

    __tablename__ = "dataset_pins"

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(HOLDER_LENGTH), primary_key=True)


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    name: str
    format: str
    row_count: int
    split_row_counts: dict[str, int]
    uri: str
    size_bytes: int
    created_at: dt.datetime
    labels: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    project: str = "default"

    @classmethod
    def from_record(cls, r: DatasetRecord, name: str | None = None) -> DatasetInfo:
        created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=dt.UTC)
        return cls(
            r.id,
            name or r.name,
            r.format,
            r.row_count,
            dict(r.split_row_counts),
            r.uri,
            r.size_bytes,
            created,
            list(r.labels or []),
            dict(r.report or {}),
            r.project,
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _add_name(session: Session, dataset_id: str, name: str) -> None:
    if session.get(NameRecord, (name, dataset_id)) is None:
        session.add(NameRecord(name=name, dataset_id=dataset_id, created_at=_now()))


class DatasetStore:
    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        migrate(self.engine, "dataset", first_table="datasets")

    def get(self, dataset_id: str) -> DatasetInfo | None:
        with Session(self.engine) as session:
            record = session.get(DatasetRecord, dataset_id)
            return DatasetInfo.from_record(record) if record else None

    def add(self, info: DatasetInfo) -> tuple[DatasetInfo, bool]:
        """Inserts the dataset under its name; if the version exists, only
        adds the name. Returns the stored dataset and whether it existed."""
        with Session(self.engine) as session, session.begin():
            existing = session.get(DatasetRecord, info.id)
            if existing is None:
                values = {k: v for k, v in info.__dict__.items()}
                session.add(DatasetRecord(**values))
            _add_name(session, info.id, info.name)
            if existing is not None:
                return DatasetInfo.from_record(existing, info.name), True
        return info, False

    def add_name(self, dataset_id: str, name: str) -> None:
        """Points `name` at a stored version too."""
        with Session(self.engine) as session, session.begin():
            _add_name(session, dataset_id, name)

    def list(self, project: str, name: str = "") -> list[DatasetInfo]:
        with Session(self.engine) as session:
            if not name:
                query = select(DatasetRecord).where(DatasetRecord.project == project).order_by(DatasetRecord.created_at.desc())
                return [DatasetInfo.from_record(r) for r in session.scalars(query)]
            query = (
                select(DatasetRecord)
                .join(NameRecord, NameRecord.dataset_id == DatasetRecord.id)
                .where(NameRecord.name == name, DatasetRecord.project == project)
                .order_by(NameRecord.created_at.desc())
            )
            return [DatasetInfo.from_record(r, name) for r in session.scalars(query)]

    def project_bytes(self, project: str) -> int:
        """Bytes of the project's stored datasets."""
        with Session(self.engine) as session:
            return int(session.scalar(select(func.coalesce(func.sum(DatasetRecord.size_bytes), 0)).where(DatasetRecord.project == project)))

    def pins(self, dataset_id: str) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(PinRecord.holder).where(PinRecord.dataset_id == dataset_id)))

    def pin(self, dataset_id: str, holder: str) -> None:
        with Session(self.engine) as session, session.begin():
            if session.get(PinRecord, (dataset_id, holder)) is None:
                session.add(PinRecord(dataset_id=dataset_id, holder=holder))

    def unpin(self, dataset_id: str, holder: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(delete(PinRecord).where(PinRecord.dataset_id == dataset_id, PinRecord.holder == holder))

    def delete(self, dataset_id: str) -> list[str]:
        """Deletes the dataset unless pinned; returns the holders that kept it."""
        with Session(self.engine) as session, session.begin():
            holders = list(session.scalars(select(PinRecord.holder).where(PinRecord.dataset_id == dataset_id)))
            if holders:
                return holders
            session.execute(delete(NameRecord).where(NameRecord.dataset_id == dataset_id))
            session.execute(delete(DatasetRecord).where(DatasetRecord.id == dataset_id))
            return []

    def close(self) -> None:
        self.engine.dispose()
