"""The event loop a service runs on (`event_loop`: auto, uvloop, asyncio)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from imgstream.consumer.run import EXIT_STARTUP_FAILED, main
from imgstream.schemas.config import WorkerConfig
from imgstream.service import loops


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop", reason="uvloop is not installed (the worker extra installs it on Linux)")
    assert loops.run(_loop_module(), "auto").startswith("uvloop")
    assert loops.run(_loop_module(), "uvloop").startswith("uvloop")


def test_asyncio_runs_on_pythons_own_loop() -> None:
    assert loops.run(_loop_module(), "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loops.loop_factory("auto") is None
    assert loops.run(_loop_module(), "auto").startswith("asyncio")
    with pytest.raises(loops.LoopUnavailable, match="pip install uvloop"):
        loops.loop_factory("uvloop")
    # The worker says so and exits before it loads anything.
    assert main(WorkerConfig(event_loop="uvloop")) == EXIT_STARTUP_FAILED
    assert "uvloop is not installed" in capfd.readouterr().err


def test_an_unknown_loop_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        WorkerConfig(event_loop="trio")
