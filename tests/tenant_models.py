"""Tenant-scoped models for the tenancy tests."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from reqscope.tenancy import TenantScoped


class TenantBase(DeclarativeBase):
    pass


class Doc(TenantScoped, TenantBase):
    __tablename__ = "reqscope_tenant_docs"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(100))
    comments: Mapped[list[Comment]] = relationship(back_populates="doc")


class Comment(TenantScoped, TenantBase):
    __tablename__ = "reqscope_tenant_comments"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    doc_id: Mapped[int] = mapped_column(ForeignKey("reqscope_tenant_docs.id"))
    body: Mapped[str] = mapped_column(String(100))
    doc: Mapped[Doc] = relationship(back_populates="comments")


TABLES = ("reqscope_tenant_docs", "reqscope_tenant_comments")


async def recreate(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(TenantBase.metadata.drop_all)
        await conn.run_sync(TenantBase.metadata.create_all)


async def drop(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(TenantBase.metadata.drop_all)
