"""A FastAPI service written the way FastAPI's tutorial writes one, on reqscope.

OAuth2 password flow with JWT bearer tokens, a ``get_current_user`` dependency that loads
the user from the database through the request's session, routers, and CRUD where reading
articles is public and writing them is not. What reqscope adds is four lines: ``setup()``,
``authenticated()`` around the tutorial's ``get_current_user``, and the two session
dependencies (``CommitOnSuccessDbDep`` for writes, ``RequestScopedDbDep`` where the route
commits itself or only reads). The session ``get_current_user`` opened becomes the user's
once the token is checked; every statement after that is refused to any other request.

Run it:  python examples/fastapi_tutorial/app.py   (port 8002; DATABASE_URL to change the
database, SECRET_KEY to keep tokens valid across restarts)
"""

import datetime as dt
import hashlib
import hmac
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import jwt
from fastapi import APIRouter, Depends, FastAPI, HTTPException, status
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from pydantic import BaseModel
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reqscope import IsolatedSessionFactory
from reqscope.fastapi import (
    CommitOnSuccessDbDep,
    RequestScopedContextDep,
    RequestScopedDbDep,
    authenticated,
    monitoring_router,
    setup,
)

ALGORITHM = "HS256"
TOKEN_MINUTES = 30


# -- models --------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "tutorial_users"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    is_operator: Mapped[bool] = mapped_column(default=False)


class Article(Base):
    __tablename__ = "tutorial_articles"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    author: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200))


class Note(Base):
    """Private to its owner: nobody else may read it."""

    __tablename__ = "tutorial_notes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    body: Mapped[str] = mapped_column(String(500))


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


class SignUp(BaseModel):
    username: str
    password: str


class ArticleIn(BaseModel):
    title: str


class NoteIn(BaseModel):
    body: str


# -- passwords and tokens (the tutorial uses pwdlib; the standard library does it here) -----


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 100_000)
    return f"{salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    salt, _, digest = stored.partition("$")
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), 100_000)
    return hmac.compare_digest(candidate.hex(), digest)


def create_app(database_url: str | None = None, *, secret_key: str | None = None) -> FastAPI:
    """The service, on ``database_url`` (an embedded SQLite database when omitted)."""
    secret = secret_key or os.environ.get("SECRET_KEY") or secrets.token_hex(32)
    factory = IsolatedSessionFactory(database_url)

    # -- authentication, as in FastAPI's "OAuth2 with Password, Bearer with JWT tokens" -----

    oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token")

    async def get_current_user(
        token: Annotated[str, Depends(oauth2_scheme)], db: RequestScopedDbDep
    ) -> User:
        credentials_exception = HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Could not validate credentials",
            headers={"WWW-Authenticate": "Bearer"},
        )
        try:
            username = jwt.decode(token, secret, algorithms=[ALGORITHM]).get("sub")
        except jwt.InvalidTokenError:
            raise credentials_exception from None
        user = await db.get(User, username) if isinstance(username, str) else None
        if user is None:
            raise credentials_exception
        return user

    def username_of(user: User) -> str:
        return user.username

    # reqscope's one addition: the user get_current_user returns is the request's user.
    CurrentUser = Annotated[User, authenticated(get_current_user, user_id=username_of)]  # noqa: N806

    async def require_operator(user: CurrentUser) -> User:
        if not user.is_operator:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "operators only")
        return user

    # -- routers ---------------------------------------------------------------------------

    accounts = APIRouter(tags=["accounts"])

    @accounts.post("/users", status_code=201)
    async def sign_up(form: SignUp, db: CommitOnSuccessDbDep) -> dict[str, str]:
        if await db.get(User, form.username) is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, "username taken")
        db.add(User(username=form.username, password_hash=hash_password(form.password)))
        return {"username": form.username}

    @accounts.post("/token")
    async def login(
        form: Annotated[OAuth2PasswordRequestForm, Depends()], db: RequestScopedDbDep
    ) -> dict[str, str]:
        user = await db.get(User, form.username)
        if user is None or not verify_password(form.password, user.password_hash):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "Incorrect username or password",
                headers={"WWW-Authenticate": "Bearer"},
            )
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=TOKEN_MINUTES)
        token = jwt.encode({"sub": user.username, "exp": expires}, secret, algorithm=ALGORITHM)
        return {"access_token": token, "token_type": "bearer"}

    @accounts.get("/users/me")
    async def read_me(user: CurrentUser, ctx: RequestScopedContextDep) -> dict[str, str]:
        return {"username": user.username, "request_user": ctx.user_id}

    articles = APIRouter(prefix="/articles", tags=["articles"])

    @articles.get("")
    async def list_articles(db: RequestScopedDbDep) -> list[dict[str, object]]:
        rows = await db.scalars(select(Article).order_by(Article.id))
        return [{"id": a.id, "author": a.author, "title": a.title} for a in rows]

    @articles.post("", status_code=201)
    async def write_article(
        new: ArticleIn, user: CurrentUser, db: CommitOnSuccessDbDep
    ) -> dict[str, object]:
        article = Article(author=user.username, title=new.title)
        db.add(article)
        await db.flush()
        return {"id": article.id, "author": article.author, "title": article.title}

    @articles.delete("/{article_id}", status_code=204)
    async def delete_article(article_id: int, user: CurrentUser, db: CommitOnSuccessDbDep) -> None:
        article = await db.get(Article, article_id)
        if article is None or article.author != user.username:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such article of yours")
        await db.delete(article)

    notes = APIRouter(prefix="/notes", tags=["notes"])

    @notes.get("")
    async def my_notes(user: CurrentUser, db: RequestScopedDbDep) -> list[str]:
        rows = await db.scalars(select(Note.body).where(Note.owner == user.username))
        return list(rows)

    @notes.post("", status_code=201)
    async def add_note(new: NoteIn, user: CurrentUser, db: CommitOnSuccessDbDep) -> dict[str, str]:
        db.add(Note(owner=user.username, body=new.body))
        return {"body": new.body}

    # -- the app ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await create_tables(factory.engine)
        yield

    app = FastAPI(title="reqscope tutorial service", lifespan=lifespan)
    # Public: signing up, logging in, reading articles, and the health probe. Everything
    # else that touches the database needs the user get_current_user finds.
    setup(
        app,
        factory,
        public_paths=("POST /users", "POST /token", "GET /articles", "GET /reqscope/health"),
    )
    app.include_router(accounts)
    app.include_router(articles)
    app.include_router(notes)
    # The health probe is public; the pool and the live sessions (user ids) are operators'.
    app.include_router(monitoring_router(factory, dependencies=[Depends(require_operator)]))

    app.state.factory = factory
    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        create_app(os.environ.get("DATABASE_URL")),
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8002")),
    )
