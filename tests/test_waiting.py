"""tests/waiting.py: `eventually` waits on its condition, and CHORUS_TEST_TIMEOUT_SCALE stretches
every bound: the helpers' and pytest-timeout's (ini value and marks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from waiting import eventually, eventually_sync

TESTS = Path(__file__).resolve().parent


async def test_eventually_returns_the_first_truthy_result() -> None:
    calls: list[int] = []

    def third_time() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert await eventually(third_time, timeout=5, interval=0.001) == 3


async def test_eventually_awaits_a_coroutine_function() -> None:
    async def ready() -> str:
        return "yes"

    assert await eventually(ready) == "yes"


async def test_eventually_names_what_did_not_happen() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"the impossible not reached in [0-9.]+s \(last: False\)"):
        await eventually(lambda: False, timeout=0.1, what="the impossible", interval=0.01)
    assert time.monotonic() - started < 5


def test_eventually_sync_waits_in_a_thread_too() -> None:
    deadline = time.monotonic() + 0.05
    assert eventually_sync(lambda: time.monotonic() > deadline, interval=0.005)


def test_the_scale_stretches_pytest_timeouts(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["waiting"]\n')
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
        import pytest
        from waiting import TIMEOUT_SCALE, scaled

        def test_ini_value(request):
            assert TIMEOUT_SCALE == 2.5 and scaled(4) == 10
            assert request.config.option.timeout == 300

        @pytest.mark.timeout(60)
        def test_mark(request):
            assert request.node.get_closest_marker("timeout").args == (150,)

        @pytest.mark.timeout(timeout=8, method="thread")
        def test_mark_with_keywords(request):
            assert request.node.get_closest_marker("timeout").kwargs == {"timeout": 20, "method": "thread"}
    """))
    env = {**os.environ, "CHORUS_TEST_TIMEOUT_SCALE": "2.5", "PYTHONPATH": str(TESTS)}
    env.pop("PYTEST_TIMEOUT", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=120",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout


def test_a_scale_that_is_not_a_positive_number_is_refused() -> None:
    for bad in ("fast", "0", "-1"):
        out = subprocess.run([sys.executable, "-c", "import waiting"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "CHORUS_TEST_TIMEOUT_SCALE": bad, "PYTHONPATH": str(TESTS)})
        assert out.returncode != 0 and "CHORUS_TEST_TIMEOUT_SCALE must be" in out.stderr, (bad, out.stderr)
