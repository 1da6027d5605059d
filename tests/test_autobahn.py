"""Autobahn|Testsuite cases 1-7 and 10 against the echo endpoint, in every test run.

Every case must be OK, NON-STRICT or INFORMATIONAL, and the summary must equal the one
committed in tests/autobahn/expected-fast.json. Cases 9, 12 and 13 take minutes:
`python tests/conformance.py slow` (see README).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from conformance import GROUPS, conformance_config, differences, failures, run_kosoku

from chorus.app import App


async def test_autobahn_fast_cases_through_the_production_hub() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = await App.build(conformance_config(tmp))
        await app.start()
        try:
            assert app.gateway is not None
            summary = await run_kosoku(f"ws://127.0.0.1:{app.gateway.port}/echo", GROUPS["fast"],
                                       Path(tmp) / "reports")
        finally:
            await app.stop()
    assert len(summary) == 247
    assert failures(summary) == {}
    assert differences(summary, "fast") == {}
