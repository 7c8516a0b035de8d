"""The embedded PostgreSQL with pgvector (the `pgserver` package) for development and tests."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running pgserver instance: its data directory and a URI to connect with."""

    data_dir: Path
    uri: str
    server: Any  # pgserver.PostgresServer; stops when the last process using it exits

    def stop(self) -> None:
        self.server.cleanup()


def start_embedded_postgres(data_dir: str | Path) -> EmbeddedPostgres:
    """Start (or join) the server on `data_dir`, creating the directory and its parents if needed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
        import pgserver
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every initdb/pg_ctl line at INFO

    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)  # pgserver insists the parent exists
    server = pgserver.get_server(path, cleanup_mode="stop")
    return EmbeddedPostgres(path, server.get_uri(), server)


def embedded_postgres_exists(data_dir: str | Path) -> bool:
    """Whether `data_dir` holds a database (so a search has something to read)."""
    return (Path(data_dir).expanduser() / "PG_VERSION").exists()
