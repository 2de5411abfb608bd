"""The database: one SQLAlchemy engine, SQLite (WAL) under $SWF_DATA_DIR or SWF_DATABASE_URL."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x5357465F4D494752  # "SWF_MIGR": the advisory lock key schema migrations take on PostgreSQL


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'swf-engine.db').resolve()}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # pysqlite's own transaction handling breaks SAVEPOINT; SQLAlchemy emits BEGIN itself instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the MWL SCP and the dispatcher read while the journal writer commits;
    # synchronous=FULL makes each commit durable before any ACK leaves.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    # No connection checkpoints on commit: a checkpoint copies pages into the database file and fsyncs
    # it, which would stall the journal writer (and every ACK waiting on it). `Store.checkpoint` runs
    # beside it instead, from `serve`, and SQLite checkpoints when the last connection closes.
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


# PostgreSQL's answers to two transactions racing (several engine instances on one database): a unique
# violation from a concurrent insert (raised once the other committed), a deadlock, a serialization failure.
# A second try in a fresh savepoint sees the other's committed rows and decides again.
_RACES = {"23505", "40P01", "40001"}


def lost_race(exc: BaseException) -> bool:
    """Whether a database error is a race with another transaction that a retry resolves (never on SQLite)."""
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return state in _RACES


def _sqlite_begin(connection) -> None:
    # straight to the DBAPI connection: through exec_driver_sql this one statement per commit cost about 6 % of
    # the engine's time under an HL7 stream
    connection.connection.driver_connection.execute("BEGIN")


class Store:
    """Owns the SQLAlchemy engine and session factory; passed down, never global."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: SqlEngine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url", self.url)
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # instances started together on an empty database: the first migrates, the others wait for its
                # commit and then find the schema at head (the lock ends with the transaction)
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def checkpoint(self) -> int:
        """Copy the WAL into the database file without blocking writers or readers (PASSIVE); returns how many
        frames the WAL holds, all of them now copied, or 0 when some are not (or not SQLite)."""
        if not self.is_sqlite:
            return 0
        with self.engine.connect() as connection:
            busy, frames, copied = connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        return frames if not busy and frames == copied else 0

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
