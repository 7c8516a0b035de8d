"""The sink's database connection: connect (creating the schema), notice it is gone, find it again.

While the database is unreachable the sink keeps what it read and retries; each change of state is
logged once, every failure counted. `sink.db_give_up_s` (off by default) bounds the wait.
"""

from __future__ import annotations

import logging
import time

import psycopg

from imgstream.kafka_clients import brief
from imgstream.schemas.config import SinkConfig
from imgstream.sink.metrics import SinkMetrics
from imgstream.sink.pgstore import HnswParams, PgStore

log = logging.getLogger("imgstream.sink")

CONNECT_TIMEOUT_S = 10  # unless the DSN says otherwise: a host that drops packets must not hold a retry for minutes
# The database cannot take writes now (down, restarting, failing over, or a standby that is read-only):
# the batch waits and is tried again. Any other database error is a bug or a setup problem.
UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)


class DatabaseGaveUp(Exception):
    """The database stayed unreachable longer than `sink.db_give_up_s`."""


class Database:
    """The sink's PostgreSQL: `store` while connected, and since when it is unreachable."""

    def __init__(self, dsn: str, config: SinkConfig, metrics: SinkMetrics) -> None:
        self.dsn = dsn
        self.config = config
        self.metrics = metrics
        self.store: PgStore | None = None
        self.down_since: float | None = None  # monotonic time the database was found unreachable
        self._hnsw = HnswParams(config.hnsw_m, config.hnsw_ef_construction)

    @property
    def reachable(self) -> bool:
        return self.store is not None and self.down_since is None

    async def reconnect(self, batch_waiting: bool = False) -> bool:
        """A fresh connection (the old one is closed); False, logged and counted, if the database is
        unreachable. With a batch waiting, the database counts as back only once it took the batch."""
        await self.close()
        try:
            store = await PgStore.connect(self._dsn_with_timeout(), self._hnsw)
        except UNAVAILABLE as exc:
            self.lost(exc, "connect")
            return False
        try:
            await store.ensure_schema()  # idempotent; a database restored from nothing gets its tables again
        except UNAVAILABLE as exc:
            await _close_quietly(store)
            self.lost(exc, "connect")
            return False
        except BaseException:
            await _close_quietly(store)
            raise
        self.store = store
        if not batch_waiting:
            self.found()
        return True

    def _dsn_with_timeout(self) -> str:
        if "connect_timeout" in psycopg.conninfo.conninfo_to_dict(self.dsn):
            return self.dsn
        return psycopg.conninfo.make_conninfo(self.dsn, connect_timeout=CONNECT_TIMEOUT_S)

    async def close(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            await _close_quietly(store)

    def lost(self, exc: BaseException, operation: str, consuming: bool = False) -> None:
        """Count the failure; log the change to "unreachable" once, and each further failure at DEBUG only."""
        self.metrics.db_errors.labels(operation=operation).inc()
        if self.down_since is not None:
            log.debug("database still unreachable (%s): %s", operation, brief(exc, 300))
            return
        self.down_since = time.monotonic()
        give_up = self.config.db_give_up_s
        log.warning("database unreachable (%s failed: %s); %s, retrying with backoff up to %.0f s %s",
                    operation, brief(exc, 300),
                    "partitions paused, nothing is committed meanwhile" if consuming else "waiting for it",
                    self.config.db_backoff_max_s,
                    f"for at most {give_up:.0f} s" if give_up is not None else "for as long as it takes")

    def found(self) -> None:
        if self.down_since is None:
            return
        waited = time.monotonic() - self.down_since
        self.down_since = None
        log.info("database reachable again after %.1f s", waited)

    def check_give_up(self) -> None:
        limit = self.config.db_give_up_s
        if limit is not None and self.down_since is not None and time.monotonic() - self.down_since >= limit:
            raise DatabaseGaveUp(f"the database has been unreachable for {limit:.0f} s (sink.db_give_up_s); "
                                 "nothing unwritten was committed")


async def _close_quietly(store: PgStore) -> None:
    try:
        await store.close()
    except Exception:  # noqa: BLE001 - a connection already lost has nothing left to close cleanly
        pass
