"""The ``reqscope`` command line: ``reqscope check`` (also ``python -m reqscope check``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
from sqlalchemy import exc as sa_exc

from reqscope import __version__
from reqscope._check import CheckReport, run_check
from reqscope._deploy import DeployReport, run_deploy_check
from reqscope._pool import POOLER_VARIABLE, POOLERS, PoolConfig
from reqscope.exceptions import ReqscopeError

__all__ = ["main"]

PROGRESS_FROM = 200  # requests: below that a run is over before a bar helps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reqscope", description="reqscope tools")
    parser.add_argument("--version", action="version", version=f"reqscope {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="run a concurrent isolated workload and verify isolation",
        description=(
            "Run a concurrent workload of many users through isolated sessions, with a tenant "
            "filter, against a table of its own (created and dropped by the check). Every "
            "request reads the table without a user filter of its own and must see only its "
            "user's rows; probes then attempt what isolation must refuse (a session used by "
            "another user, by a later request, after its block; a row written for another "
            "user). Nothing may leak. Exits 1 on any breach or violation, 2 on a usage or "
            "connection error."
        ),
    )
    check.add_argument("--database-url", help="async SQLAlchemy URL (default: embedded SQLite)")
    check.add_argument("--users", type=int, default=20)
    check.add_argument("--requests", type=int, default=500)
    check.add_argument("--concurrency", type=int, default=50)
    check.add_argument(
        "--pool-size", type=int, help="connections (default: 10, or 4 on SQLite: one writer)"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    deploy = check.add_argument_group(
        "deploy checks",
        "--deploy checks the production PostgreSQL at --database-url instead (read-only): a "
        "transaction-mode pooler with prepared statements on, a role that bypasses row-level "
        "security, the URL's TLS mode against the server's, workers x pool against "
        "max_connections, statement and idle-in-transaction timeouts. Exits 1 when any fails.",
    )
    deploy.add_argument("--deploy", action="store_true", help="run the deploy checks")
    deploy.add_argument(
        "--workers", type=int, default=1, help="processes that each open a pool (default: 1)"
    )
    deploy.add_argument(
        "--max-overflow", type=int, help="each pool's max_overflow (default: 15; pool size 10)"
    )
    deploy.add_argument(
        "--pooler", choices=POOLERS, help=f"the pooler the application declares ({POOLER_VARIABLE})"
    )
    deploy.add_argument(
        "--tables",
        help="the tenant tables, comma-separated (default: every table with row-level security)",
    )
    return parser


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _render(report: CheckReport) -> str:
    verdict = "OK: every request was an island" if report.ok else "FAILED: isolation broke"
    lines = [
        f"reqscope check — {report.database}",
        (
            f"  users {report.users}, requests {report.requests}, concurrency "
            f"{report.concurrency}, pool {report.pool_size}"
        ),
        (
            f"  completed {report.completed}, failed {report.failed} in {report.seconds:.2f} s "
            f"({report.throughput:.0f} req/s; p50 {report.p50_ms:.1f} ms, "
            f"p99 {report.p99_ms:.1f} ms)"
        ),
        (
            f"  foreign rows seen {report.foreign_rows_seen}, uncommitted rows seen "
            f"{report.uncommitted_rows_seen}, wrong session owner {report.wrong_session_owner}"
        ),
        (
            f"  leaked sessions {report.leaked_sessions}, connections checked out after "
            f"{report.checked_out_after}, violations during the workload "
            f"{report.isolation_violations}, "
            f"pool high-water mark {report.pool_high_water}"
        ),
        f"  probes refused {report.probes_refused} of {report.probes}",
    ]
    lines.extend(f"  BREACH: {breach}" for breach in report.breaches)
    lines.extend(f"  error: {error}" for error in report.errors)
    lines.extend(f"  warning: {warning}" for warning in report.warnings)
    lines.append(verdict)
    return "\n".join(lines)


def _render_deploy(report: DeployReport) -> str:
    lines = [f"reqscope check --deploy — {report.database} as {report.role!r}"]
    for finding in report.findings:
        lines.append(f"  {finding.status.upper():<4}  {finding.check}: {finding.summary}")
        if finding.advice and finding.status != "pass":
            lines.append(f"        do: {finding.advice}")
    lines.append("OK: no trap found" if report.ok else "FAILED: fix what fails before deploying")
    return "\n".join(lines)


class _Report(Protocol):
    @property
    def ok(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Report)


def _report(
    command: str, run: Callable[[], Awaitable[R]], render: Callable[[R], str], as_json: bool
) -> int:
    """Run a check, print its report (or JSON); 0 when ok, 1 when not, 2 when it could not run."""
    try:
        report = anyio.run(run)
    except (ReqscopeError, ValueError, OSError, sa_exc.SQLAlchemyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{command}: error: {message}", file=sys.stderr)  # noqa: T201
        return 2
    print(json.dumps(report.to_dict(), indent=2) if as_json else render(report))  # noqa: T201
    return 0 if report.ok else 1


def _deploy(args: argparse.Namespace) -> int:
    if not args.database_url:
        print("reqscope check --deploy: error: give --database-url", file=sys.stderr)  # noqa: T201
        return 2
    standard = PoolConfig.standard()
    try:
        pool = PoolConfig(
            pool_size=args.pool_size or standard.pool_size,
            max_overflow=standard.max_overflow if args.max_overflow is None else args.max_overflow,
        )
    except ValueError as exc:
        print(f"reqscope check --deploy: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    tables = tuple(t.strip() for t in (args.tables or "").split(",") if t.strip())
    return _report(
        "reqscope check --deploy",
        lambda: run_deploy_check(
            args.database_url, workers=args.workers, pool=pool, pooler=args.pooler, tables=tables
        ),
        _render_deploy,
        args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 isolation failure, 2 error)."""
    args = _parser().parse_args(argv)
    if args.deploy:
        return _deploy(args)
    show_progress = not args.json and sys.stderr.isatty() and args.requests >= PROGRESS_FROM
    return _report(
        "reqscope check",
        lambda: run_check(
            args.database_url,
            users=args.users,
            requests=args.requests,
            concurrency=args.concurrency,
            pool_size=args.pool_size,
            progress=_progress if show_progress else None,
        ),
        _render,
        args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
