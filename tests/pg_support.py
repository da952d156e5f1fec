"""A PostgreSQL server of its own for a test module (Debian's `postgresql` package; `.ci/run` installs it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PG_BIN = [Path(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"))] if Path("/usr/lib/postgresql").is_dir() \
    else []


def pg_tool(name: str) -> str | None:
    return shutil.which(name) or next((str(b / name) for b in PG_BIN if (b / name).is_file()), None)


@contextlib.contextmanager
def temporary_postgres():
    """A PostgreSQL server of its own (initdb in a temporary folder, a Unix socket there, trust auth), stopped and
    removed on exit; yields its URL. As root it runs as the `postgres` user, which Debian's package creates."""
    initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise FileNotFoundError("PostgreSQL's initdb/pg_ctl are not installed (.ci/run installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="qimg-pg-", dir="/tmp"))
    data = root / "data"
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "qimg", "-E", "UTF8"], check=True,
                       capture_output=True)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                        f"-k {root} -p {port} -c listen_addresses=''", "start"], check=True, capture_output=True)
        yield f"postgresql://qimg@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server per test module (skipped where PostgreSQL or psycopg is not installed)."""
    pytest.importorskip("psycopg")
    if pg_tool("initdb") is None or pg_tool("pg_ctl") is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (.ci/run installs Debian's postgresql)")
    with temporary_postgres() as url:
        yield url
