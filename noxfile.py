"""Development sessions: nox -s lint typecheck tests docs bench; compat lowest (CI's matrix)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "src")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine")
    session.run("coverage", "report")  # fail_under: pyproject.toml


def declared_floor(package: str) -> str:
    """The lowest version of ``package`` that pyproject.toml's dependencies allow."""
    text = Path(__file__).with_name("pyproject.toml").read_text()
    match = re.search(rf'"{package}(?:\[[^\]]*\])?>=([^,";]+)', text)
    if match is None:
        raise LookupError(f"pyproject.toml declares no lower bound for {package}")
    return match.group(1)


def show_versions(session: nox.Session) -> None:
    session.run(
        "python",
        "-c",
        "import sys, anyio, fastapi, sqlalchemy, starlette; from importlib.metadata import "
        "version; print('python', sys.version.split()[0], '| sqlalchemy', sqlalchemy.__version__,"
        " '| anyio', version('anyio'), '| fastapi', fastapi.__version__, '| starlette',"
        " starlette.__version__)",
        silent=False,
    )


def sqlite_and_tenancy(session: nox.Session) -> None:
    """The suite on SQLite alone, then tenancy on every configured server (PostgreSQL's RLS)."""
    no_servers = {name: "" for name in os.environ if name.startswith("REQSCOPE_TEST_")}
    session.run("pytest", "-q", env={**no_servers, "REQSCOPE_REQUIRE_SERVICES": "0"})
    session.run("pytest", "-q", "tests/test_tenancy.py", "tests/databases/test_tenancy_postgres.py")


@nox.session(python=PYTHONS, venv_backend="uv")
@nox.parametrize("sqlalchemy", ["lowest", "highest"])
def compat(session: nox.Session, sqlalchemy: str) -> None:
    """One Python with the lowest or the highest SQLAlchemy that pyproject.toml allows.

    The newest combination runs the whole suite; the others run the SQLite suite and
    tenancy on the servers (what differs between SQLAlchemy releases is the ORM and the
    pool, which the SQLite suite covers, and row-level security, which needs PostgreSQL).
    """
    session.install("-e", ".[dev]")
    if sqlalchemy == "lowest":
        session.install(f"sqlalchemy[asyncio]=={declared_floor('sqlalchemy')}")
    show_versions(session)
    if session.python == PYTHONS[-1] and sqlalchemy == "highest":
        session.run("pytest", "-q", *session.posargs)
    else:
        sqlite_and_tenancy(session)


@nox.session(python=PYTHONS[0], venv_backend="uv")
def lowest(session: nox.Session) -> None:
    """Every direct dependency at the lowest version declared (anyio, FastAPI, the drivers…)."""
    session.install("--resolution=lowest-direct", "-e", ".[dev]")
    show_versions(session)
    sqlite_and_tenancy(session)


@nox.session(python="3.11")
def core(session: nox.Session) -> None:
    """The core without framework extras: adapters must not be needed to import it."""
    session.install("-e", ".[sqlite,testing]", "pytest-timeout", "pytest-asyncio", "anyio")
    session.run(
        "pytest", "tests/test_context.py", "tests/test_sessions.py", "tests/test_public_api.py"
    )


@nox.session
def docs(session: nox.Session) -> None:
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/context.py")
    session.run("python", "benchmarks/bytecodes.py")
    session.run("python", "benchmarks/sessions.py", *session.posargs)
