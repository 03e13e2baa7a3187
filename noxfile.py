"""Development sessions: nox -s lint typecheck tests docs bench."""

from __future__ import annotations

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
    session.run("coverage", "report", "--fail-under=90")


@nox.session(python="3.11")
def core(session: nox.Session) -> None:
    """The core without framework extras: adapters must not be needed to import it."""
    session.install("-e", ".[sqlite,testing]", "pytest-timeout", "anyio")
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
