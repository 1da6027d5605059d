"""Waiting in tests: on a condition, never a fixed sleep, under one timeout scale.

CHORUS_TEST_TIMEOUT_SCALE (default 1) multiplies every bound a test waits under: the clients'
event waits (tests/clients.py), `eventually`, the services' and roles' start-up timeouts and
pytest-timeout's per-test limit (tests/conftest.py). Set it to 2 or 3 on a slow or loaded
machine; a bound only says when to give up, so a larger one never slows a passing test.

Sleeps that are the behaviour under test (pacing a sender, letting a rate window or a TTL pass,
"nothing arrives within X") stay plain sleeps in the tests and are not scaled.

tests/conftest.py loads this module as a pytest plugin too: its hooks below scale
pytest-timeout's limits (the `timeout` ini value and every `timeout` mark).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import pytest

__all__ = ["TIMEOUT_SCALE", "eventually", "eventually_sync", "scaled"]

T = TypeVar("T")

POLL_S = 0.05  # how often a condition is checked again


def _read_scale() -> float:
    raw = os.environ.get("CHORUS_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"CHORUS_TEST_TIMEOUT_SCALE must be a number, got {raw!r}") from None
    if not scale > 0:
        raise ValueError(f"CHORUS_TEST_TIMEOUT_SCALE must be above 0, got {raw!r}")
    return scale


TIMEOUT_SCALE = _read_scale()


def scaled(seconds: float) -> float:
    """A bound of ``seconds`` on a calm machine, stretched by CHORUS_TEST_TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


@overload
async def eventually(check: Callable[[], Awaitable[T]], timeout: float = ..., what: str = ...,
                     interval: float = ...) -> T: ...
@overload
async def eventually(check: Callable[[], T], timeout: float = ..., what: str = ..., interval: float = ...) -> T: ...
async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                     interval: float = POLL_S) -> Any:
    """Call ``check`` (a function or a coroutine function) until it returns something truthy;
    returns that. Raises AssertionError naming ``what`` when ``timeout`` (scaled) passes first."""
    bound = scaled(timeout)
    deadline = time.monotonic() + bound
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {bound:g}s (last: {got!r})")
        await asyncio.sleep(interval)


def eventually_sync(check: Callable[[], T], timeout: float = 10.0, what: str = "condition",
                    interval: float = POLL_S) -> T:
    """:func:`eventually` for blocking code (a thread, a fixture that is not async)."""
    bound = scaled(timeout)
    deadline = time.monotonic() + bound
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {bound:g}s (last: {got!r})")
        time.sleep(interval)


@pytest.hookimpl(tryfirst=True)  # before pytest-timeout reads its settings
def pytest_configure(config: pytest.Config) -> None:
    # An explicit --timeout or PYTEST_TIMEOUT is the user's own limit: left as given.
    if TIMEOUT_SCALE != 1 and config.option.timeout is None and not os.environ.get("PYTEST_TIMEOUT"):
        ini = config.getini("timeout")
        if ini:
            config.option.timeout = scaled(float(ini))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if TIMEOUT_SCALE == 1:
        return
    for item in items:
        mark = item.get_closest_marker("timeout")
        if mark is None:
            continue
        args, kwargs = list(mark.args), dict(mark.kwargs)
        if "timeout" in kwargs:
            kwargs["timeout"] = scaled(float(kwargs["timeout"]))
        elif args:
            args[0] = scaled(float(args[0]))
        # the item's own mark comes first, so pytest-timeout finds this one
        item.add_marker(pytest.mark.timeout(*args, **kwargs), append=False)
