"""The ``serve`` fixture: real annotation servers, each stopped at the end of its test."""

from __future__ import annotations

from pathlib import Path

import pytest
from annotate_helpers import Server, start_server


@pytest.fixture
def serve(tmp_path):
    """Factory: ``serve(*cli_args, db=…)`` starts a server; every server is stopped at the end of the test."""
    started: list[Server] = []

    def make(*args: str, db: Path | None = None, env: dict | None = None) -> Server:
        server = start_server(db or tmp_path / "annotations.sqlite", *args, env=env)
        started.append(server)
        return server

    yield make
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=20)
        server.process.stdout.close()
