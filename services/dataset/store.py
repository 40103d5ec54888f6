"""Dataset metadata in SQL (SQLite by default). Bytes live in the artifact store."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import JSON, BigInteger, DateTime, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tunewire.services.common.db import make_engine


class Base(DeclarativeBase):
    pass


class DatasetRecord(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    format: Mapped[str] = mapped_column(String(32))
    row_count: Mapped[int] = mapped_column(BigInteger)
    split_row_counts: Mapped[dict] = mapped_column(JSON)
    uri: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


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

    @classmethod
    def from_record(cls, r: DatasetRecord) -> DatasetInfo:
        created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=dt.UTC)
        return cls(r.id, r.name, r.format, r.row_count, dict(r.split_row_counts), r.uri, r.size_bytes, created)


class DatasetStore:
    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        Base.metadata.create_all(self.engine)

    def get(self, dataset_id: str) -> DatasetInfo | None:
        with Session(self.engine) as session:
            record = session.get(DatasetRecord, dataset_id)
            return DatasetInfo.from_record(record) if record else None

    def add(self, info: DatasetInfo) -> DatasetInfo:
        """Inserts the dataset, or returns the one already stored under its id."""
        with Session(self.engine) as session, session.begin():
            existing = session.get(DatasetRecord, info.id)
            if existing is not None:
                return DatasetInfo.from_record(existing)
            session.add(DatasetRecord(**info.__dict__))
        return info

    def list(self, name: str = "") -> list[DatasetInfo]:
        query = select(DatasetRecord).order_by(DatasetRecord.created_at.desc())
        if name:
            query = query.where(DatasetRecord.name == name)
        with Session(self.engine) as session:
            return [DatasetInfo.from_record(r) for r in session.scalars(query)]

    def close(self) -> None:
        self.engine.dispose()
