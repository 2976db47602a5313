"""Fixtures of the annotation tests: real annotation servers (``serve``), each stopped at the end of its test; a
throwaway PostgreSQL server (``postgres``) for the session; ``database``, each backend-specific test's database,
once a SQLite file and once a fresh PostgreSQL database."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from annotate_helpers import Server, start_server


@pytest.fixture
def serve(tmp_path):
    """Factory: ``serve(*cli_args, db=…)`` starts a server; every server is stopped at the end of the test."""
    started: list[Server] = []

    def make(*args: str, db: Path | str | None = None, env: dict | None = None) -> Server:
        server = start_server(db or tmp_path / "annotations.sqlite", *args, env=env)
        started.append(server)
        return server

    yield make
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=20)
        server.process.stdout.close()


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: Debian keeps them off PATH, in /usr/lib/postgresql/VERSION/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb and (Path(initdb).parent / "pg_ctl").is_file() else None


@dataclass
class Postgres:
    """A running throwaway cluster on 127.0.0.1:``port``, trusting its superuser ``user`` without a password."""

    port: int
    user: str = "preftune"
    databases: list[str] = field(default_factory=list)

    def url(self, dbname: str = "postgres", schema: str | None = None) -> str:
        return (f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"
                + (f"?options=-csearch_path%3D{schema}" if schema else ""))

    def create_database(self) -> str:
        """A fresh, empty database, its URL: a new schema, which the URL makes the connection's search path
        (as a team would keep annotations apart in a shared database; and milliseconds, not a CREATE DATABASE)."""
        import psycopg

        name = f"annotations_{len(self.databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        self.databases.append(name)
        return self.url(schema=name)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session, in a temporary folder, stopped and removed at the end.

    initdb refuses to run as root: as root the cluster belongs to the ``postgres`` user (Debian's package makes it)
    or ``nobody``, through ``runuser``. fsync is off: the tests kill annotation servers, never this one, so every
    committed vote is in the server whatever reaches the disk."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install -e '.[annotate-postgres]')")
    root = Path(tempfile.mkdtemp(prefix="preftune-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        owner = "postgres"
        try:
            pwd.getpwnam(owner)
        except KeyError:
            owner = "nobody"
        shutil.chown(root, owner)
        run_as = ["runuser", "-u", owner, "--"]
    data = root / "data"
    with socket.socket() as s:  # a free port (the socket closes before the server binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Postgres(port)

    def run(*args: str) -> None:
        done = subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", cluster.user, "--auth=trust", "-E", "UTF8",
            "--no-sync", "--no-instructions")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off", "start")
        yield cluster
    finally:
        if (data / "postmaster.pid").exists():
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """The database of a backend-specific test: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "annotations.sqlite")
    return request.getfixturevalue("postgres").create_database()
