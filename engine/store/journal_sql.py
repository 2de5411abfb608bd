"""The journal's hot statements: duplicate look-up, message and delivery inserts, delivery outcomes.

They run for every message on the ACK path, inside the journal writer's transaction. Through SQLAlchemy Core
each costs more Python time than SQLite spends executing it (compiling parameters, result metadata, events),
and that time holds the GIL the event loop needs to answer the next connection. On SQLite they therefore go
straight to the DBAPI cursor of the same connection and transaction; other databases keep Core statements.
Both paths take and return the same plain values, and tests run both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Sequence

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from engine.store.tables import Delivery, DeliveryAttempt, Message

MESSAGE = Message.__table__
DELIVERY = Delivery.__table__
ATTEMPT = DeliveryAttempt.__table__

MESSAGE_COLUMNS = ("channel", "received_at", "peer", "content_type", "sender", "control_id", "message_type",
                   "charset", "raw", "text", "status", "ack_code", "error", "accepted_key", "patient_id",
                   "accession")
DELIVERY_COLUMNS = ("message_id", "channel", "destination", "status", "attempts", "next_attempt_at",
                    "content_type", "payload", "created_at", "updated_at", "last_error", "response")
ATTEMPT_COLUMNS = ("delivery_id", "at", "outcome", "detail")


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"


def sqlite_datetime(value: datetime) -> str:
    """The text SQLAlchemy's SQLite DATETIME type stores, so rows written either way read back the same: the
    wall time, without the zone (cut off rather than replaced: no new datetime per value)."""
    return value.isoformat(" ", "microseconds")[:26]


def _sqlite_rows(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[tuple]:
    """Parameters for executemany. A batch's rows share their times (a delivery's are all `now`), and
    formatting each again was a twentieth of the writer's time: each time object is formatted once (by identity:
    equal instants in two zones have different wall times)."""
    texts: dict[int, str] = {}

    def text(value: datetime) -> str:
        formatted = texts.get(id(value))
        if formatted is None:
            formatted = texts[id(value)] = sqlite_datetime(value)
        return formatted

    return [tuple([text(v) if isinstance(v, datetime) else v for v in map(row.__getitem__, columns)])
            for row in rows]


class JournalStatements:
    """The same statements on any database; direct DBAPI calls when it is SQLite."""

    INSERT_MESSAGE = _insert_sql("message", MESSAGE_COLUMNS)
    INSERT_DELIVERY = _insert_sql("delivery", DELIVERY_COLUMNS)
    INSERT_ATTEMPT = _insert_sql("delivery_attempt", ATTEMPT_COLUMNS)
    MARK_SENT = ("UPDATE delivery SET status = 'sent', attempts = ?, sent_at = ?, updated_at = ?, response = ?, "
                 "last_error = '' WHERE id = ?")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.sqlite = connection.dialect.name == "sqlite"

    def _cursor(self):
        return self.connection.connection.driver_connection.cursor()

    def accepted(self, keys: list[str]) -> dict[str, tuple[int, str]]:
        """Messages already accepted under these idempotency keys: key -> (message id, ACK code)."""
        if not keys:
            return {}
        if self.sqlite:
            marks = ",".join("?" * len(keys))
            rows = self._cursor().execute(
                f"SELECT accepted_key, id, ack_code FROM message WHERE accepted_key IN ({marks})", keys).fetchall()
        else:
            rows = self.connection.execute(select(MESSAGE.c.accepted_key, MESSAGE.c.id, MESSAGE.c.ack_code)
                                           .where(MESSAGE.c.accepted_key.in_(keys))).all()
        return {key: (message_id, ack or "AA") for key, message_id, ack in rows}

    def insert_messages(self, rows: list[dict[str, Any]]) -> list[int]:
        """Insert message rows; their ids, in the order of `rows`."""
        if not rows:
            return []
        if not self.sqlite:
            result = self.connection.execute(insert(MESSAGE).returning(MESSAGE.c.id, sort_by_parameter_order=True),
                                             rows)
            return list(result.scalars())
        cursor = self._cursor()
        cursor.executemany(self.INSERT_MESSAGE, _sqlite_rows(rows, MESSAGE_COLUMNS))
        # An INTEGER PRIMARY KEY takes max(id) + 1 (until 2**63 - 1), and this transaction holds SQLite's
        # only write lock, so the rows just inserted have consecutive ids ending at the last one.
        last = cursor.execute("SELECT last_insert_rowid()").fetchone()[0]
        return list(range(last - len(rows) + 1, last + 1))

    def insert_deliveries(self, rows: list[dict[str, Any]]) -> None:
        self._insert_many(DELIVERY, self.INSERT_DELIVERY, DELIVERY_COLUMNS, rows)

    def insert_attempts(self, rows: list[dict[str, Any]]) -> None:
        self._insert_many(ATTEMPT, self.INSERT_ATTEMPT, ATTEMPT_COLUMNS, rows)

    DUE = ("SELECT id, payload, attempts, next_attempt_at FROM delivery WHERE channel = ? AND destination = ? "
           "AND status IN ('queued', 'error') ORDER BY id LIMIT ?")

    def due(self, channel: str, destination: str, limit: int) -> list[tuple[int, bytes, int, datetime]]:
        """A destination's pending deliveries, oldest first: (id, payload, attempts, next attempt)."""
        if not self.sqlite:
            rows = self.connection.execute(
                select(DELIVERY.c.id, DELIVERY.c.payload, DELIVERY.c.attempts, DELIVERY.c.next_attempt_at)
                .where(DELIVERY.c.channel == channel, DELIVERY.c.destination == destination,
                       DELIVERY.c.status.in_(("queued", "error")))
                .order_by(DELIVERY.c.id).limit(limit)).all()
            return [tuple(row) for row in rows]
        rows = self._cursor().execute(self.DUE, (channel, destination, limit)).fetchall()
        return [(i, bytes(payload), attempts, datetime.fromisoformat(at)) for i, payload, attempts, at in rows]

    def mark_sent(self, sent: Iterable[tuple[int, int, str]], now: datetime) -> None:
        """(delivery id, attempt count, the receiver's answer) for each delivery now sent."""
        sent = list(sent)
        if not sent:
            return
        if self.sqlite:
            stamp = sqlite_datetime(now)
            self._cursor().executemany(self.MARK_SENT, [(n, stamp, stamp, answer, d) for d, n, answer in sent])
            return
        self.connection.execute(
            update(DELIVERY).where(DELIVERY.c.id == bindparam("delivery_id")).values(
                status="sent", attempts=bindparam("attempt_count"), sent_at=now, updated_at=now,
                response=bindparam("answer"), last_error=""),
            [{"delivery_id": d, "attempt_count": n, "answer": answer} for d, n, answer in sent],
        )

    def _insert_many(self, table, sql: str, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.sqlite:
            self._cursor().executemany(sql, _sqlite_rows(rows, columns))
        else:
            self.connection.execute(insert(table), rows)
