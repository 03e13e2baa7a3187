from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import reqscope
from reqscope import exceptions

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_complete_and_importable() -> None:
    assert reqscope.__all__ == sorted(reqscope.__all__)
    for name in reqscope.__all__:
        assert hasattr(reqscope, name), name
    public = {
        name
        for name, value in vars(reqscope).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("reqscope")
    }
    assert public <= set(reqscope.__all__)
    assert set(exceptions.__all__) <= set(reqscope.__all__)


def test_every_public_name_has_a_docstring() -> None:
    for name in reqscope.__all__:
        value = getattr(reqscope, name)
        if callable(value):
            assert value.__doc__, name


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (exceptions.ContextValidationError, (ValueError,)),
        (exceptions.NoActiveContextError, (LookupError,)),
        (exceptions.SessionReclaimedError, (exceptions.SessionScopeError,)),
        (exceptions.PoolExhaustedError, (TimeoutError,)),
        (exceptions.AgentNotRegisteredError, (KeyError,)),
        (exceptions.RequestTimeoutError, (TimeoutError,)),
        (exceptions.DatabaseUnavailableError, (ConnectionError,)),
        (exceptions.IsolationViolation, ()),
        (exceptions.CircuitOpenError, ()),
        (exceptions.AgentCreationError, ()),
    ],
)
def test_error_hierarchy(error, bases) -> None:
    assert issubclass(error, exceptions.ReqscopeError)
    for base in bases:
        assert issubclass(error, base)


def test_error_messages() -> None:
    assert "retry in 1.50 s" in str(exceptions.CircuitOpenError(1.5))
    missing = exceptions.AgentNotRegisteredError("x", ("a", "b"))
    assert str(missing).startswith("no agent is registered as 'x'")
    assert "register" in str(missing)
    assert "use_context" in str(exceptions.NoActiveContextError())


def test_importing_reqscope_imports_no_framework() -> None:
    code = (
        "import sys, reqscope, reqscope.testing;"
        "bad = [m for m in ('fastapi', 'starlette') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # noqa: S603


def test_py_typed_is_shipped() -> None:
    assert (Path(reqscope.__file__).parent / "py.typed").exists()


def test_quickstart_example_runs() -> None:
    result = subprocess.run(  # noqa: S603
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "[['hi'], ['hello']]" in result.stdout
    assert "refused: execute" in result.stdout
