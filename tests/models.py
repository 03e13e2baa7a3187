"""A small ORM model shared by the session, tenancy and example tests."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "reqscope_test_notes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    body: Mapped[str] = mapped_column(String(200))
    tags: Mapped[list[Tag]] = relationship(back_populates="note", cascade="all, delete-orphan")


class Tag(Base):
    __tablename__ = "reqscope_test_tags"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    note_id: Mapped[int] = mapped_column(ForeignKey("reqscope_test_notes.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(50))
    note: Mapped[Note] = relationship(back_populates="tags")


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


async def drop_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
