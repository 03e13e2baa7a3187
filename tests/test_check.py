from __future__ import annotations

import json
import subprocess
import sys

import anyio
import pytest

from reqscope.__main__ import main
from reqscope._check import run_check


def test_check_on_the_embedded_default(capsys) -> None:
    assert main(["check", "--requests", "120", "--users", "7", "--concurrency", "12"]) == 0
    out = capsys.readouterr().out
    assert "OK: every request was an island" in out
    assert "users 7, requests 120, concurrency 12" in out
    assert "foreign rows seen 0" in out


def test_check_json(capsys) -> None:
    assert main(["check", "--requests", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["completed"] == 40
    assert report["leaked_sessions"] == 0
    assert report["checked_out_after"] == 0
    assert report["pool_high_water"] <= report["pool_size"]
    assert report["p99_ms"] >= report["p50_ms"] > 0


def test_check_against_a_server(database, capsys) -> None:
    assert main(["check", "--database-url", database.url, "--requests", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"]
    # SQLite's single writer gets a small pool by default; servers get 10 connections.
    assert report["pool_size"] == (4 if database.name == "sqlite" else 10)
    assert (
        main(["check", "--database-url", database.url, "--requests", "20", "--pool-size", "3"]) == 0
    )
    assert "pool 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "cannot parse"),
        ("nope://x", "cannot create an engine"),
        ("postgresql+asyncpg://postgres@127.0.0.1:1/test", "cannot connect"),
        ("mysql+aiomysql://root@127.0.0.1/test", "pip install aiomysql"),
        ("sqlite+aiosqlite://", "in-memory SQLite"),
    ],
)
def test_check_errors_are_one_line(url, message, capsys) -> None:
    assert main(["check", "--database-url", url, "--requests", "5"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert err.startswith("reqscope check: error:")


def test_bad_numbers_are_usage_errors(capsys) -> None:
    assert main(["check", "--users", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_a_broken_isolation_is_reported() -> None:
    # The check's own verdict logic: any violation counter makes it fail.
    report = anyio.run(lambda: run_check(None, requests=20, users=3, concurrency=5, pool_size=2))
    assert report.ok
    report.uncommitted_rows_seen = 1
    assert not report.ok
    assert report.to_dict()["ok"] is False


def test_the_check_attempts_what_it_reports(capsys) -> None:
    assert main(["check", "--requests", "30", "--users", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["probes"] == report["probes_refused"] == 12  # 3 rounds of 4 attempts
    assert report["breaches"] == []


def test_the_check_fails_when_sessions_are_not_policed(monkeypatch, capsys) -> None:
    """A stub enforcement: every session is usable by anyone, any time."""
    import reqscope._enforcement

    monkeypatch.setattr(reqscope._enforcement, "_check", lambda *_: None)
    assert main(["check", "--requests", "30", "--users", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: isolation broke" in out
    assert "probes refused 3 of 12" in out  # only the foreign rows written: the tenant guard
    assert (
        "BREACH: user 'check-user-0''s session used by user 'reqscope-check-intruder' was allowed"
        in out
    )
    assert "used by a later request of the same user was allowed" in out
    assert "used after its block ended was allowed" in out


def test_the_check_fails_when_the_tenant_filter_lets_rows_through(monkeypatch, capsys) -> None:
    """A stub tenant layer: reads are not filtered, writes not guarded."""
    import reqscope._enforcement

    monkeypatch.setattr(reqscope._enforcement, "add_tenant_criteria", lambda *_: None)
    monkeypatch.setattr(reqscope._enforcement, "guard_flush", lambda *_: None)
    assert main(["check", "--requests", "30", "--users", "3"]) == 1
    out = capsys.readouterr().out
    assert "row(s) of other users through the tenant filter" in out
    assert "BREACH: a row for user 'reqscope-check-intruder' written by user" in out
    assert "FAILED: isolation broke" in out


def test_console_entry_point_and_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reqscope", "check", "--requests", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_removes_its_table(tmp_path) -> None:
    from sqlalchemy import create_engine, inspect

    path = tmp_path / "own.db"
    assert main(["check", "--database-url", f"sqlite+aiosqlite:///{path}", "--requests", "20"]) == 0
    engine = create_engine(f"sqlite:///{path}")
    try:
        assert inspect(engine).get_table_names() == []  # created and dropped again
    finally:
        engine.dispose()


def test_progress_bar(capsys) -> None:
    from reqscope.__main__ import _progress

    _progress(5, 10)
    _progress(10, 10)
    err = capsys.readouterr().err
    assert "[###############...............] 5/10" in err
    assert err.endswith("] 10/10\n")


def test_version_has_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import reqscope

    assert version("reqscope") == reqscope.__version__  # the build reads __init__.py
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"reqscope {reqscope.__version__}"
