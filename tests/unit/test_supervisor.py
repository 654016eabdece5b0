"""The server's Supervisor (section 13 of ncctl.py) in-process: a watched part that ends
unasked makes wait() return 1 with one log line naming it and its cause; a stop request
returns 0; threads it does not watch keep the usual excepthook. And the tools the server
runs keep running while its gRPC servers serve."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures

import pytest

import ncctl


@pytest.fixture
def supervisor() -> Iterator[ncctl.Supervisor]:
    supervisor = ncctl.Supervisor()
    threading.excepthook = supervisor.on_thread_exception
    yield supervisor
    threading.excepthook = ncctl.THREAD_EXCEPTHOOK


def fails() -> None:
    raise RuntimeError("disk on fire\nsecond line")


def test_a_watched_thread_that_raises_ends_the_wait_with_one_line(
    supervisor: ncctl.Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nc")
    healthy = threading.Event()
    keeps_running = threading.Thread(target=healthy.wait, name="cache-sync", daemon=True)
    dies = threading.Thread(target=fails, name="store-worker", daemon=True)
    for thread in (keeps_running, dies):
        supervisor.watch_thread(thread)
        thread.start()
    dies.join()
    assert supervisor.wait(threading.Event()) == 1
    healthy.set()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1, lines
    assert "thread store-worker stopped unexpectedly" in lines[0]
    assert "RuntimeError: disk on fire\\nsecond line" in lines[0], "the cause stays on the one line"


def test_a_part_that_ends_without_an_exception_is_named_too(
    supervisor: ncctl.Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor.watch("gRPC control server", lambda: False)
    assert supervisor.wait(threading.Event()) == 1
    assert any("gRPC control server stopped unexpectedly (it ended)" in r.getMessage() for r in caplog.records)


def test_a_stop_request_ends_the_wait_with_zero(supervisor: ncctl.Supervisor) -> None:
    stop = threading.Event()
    supervisor.watch("packet loop", lambda: True)
    threading.Timer(0.2, stop.set).start()
    assert supervisor.wait(stop) == 0


def test_threads_it_does_not_watch_keep_the_usual_traceback(
    supervisor: ncctl.Supervisor, capsys: pytest.CaptureFixture
) -> None:
    stranger = threading.Thread(target=fails, name="library-thread")
    stranger.start()
    stranger.join()
    assert "Traceback" in capsys.readouterr().err
    assert supervisor.dead() is None and not supervisor.causes


def test_tools_run_while_grpc_serves() -> None:
    """On 3.9, whose subprocess forks, gRPC's fork handlers aborted some children of a
    serving process before their exec (nc turns the handlers off; see the top of ncctl)."""
    grpc, _, _ = ncctl.grpc_modules()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for _ in range(300):
            ncctl.run_tool("true")
    finally:
        server.stop(grace=None)
