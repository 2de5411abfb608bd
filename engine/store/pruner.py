"""The journal pruner: archive, then remove, messages older than their channel's retention (config `retention`).

Like an integration engine's data pruner, per journal channel (message.channel): messages older than `days` (in
error, or with a dead delivery: `keep_errors_days`) are written to $SWF_DATA_DIR/archive/<channel>/<YYYYMMDD>/ as
gzip JSON lines (one message with its deliveries and attempts per line, bytes as base64, so raw bytes come back
exactly), then deleted. Never removed: a message with a delivery still queued or retrying, and a message another
table points at (report versions, capture items: every foreign key to message.id but delivery's, found from the
schema so a new table is covered without a change here).

Writes go through `write(work)`: inside `serve` the journal writer's `run_blocking`, the only SQLite writer on
the ACK path, so one batch (`prune_batch` messages) is one short job among the ACKs; on the command line a
transaction of its own. Reads and archive files happen outside it. Each delete re-checks, in its transaction,
what the read saw: a delivery requeued in between keeps its message. The archive is written before the delete
commits, so a crash in between archives a batch twice (records carry their message id), never loses one.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import re
import tempfile
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from sqlalchemy import Column, and_, delete, or_, select
from sqlalchemy.orm import Session

from engine.clock import Clock
from engine.config import Config, Retention
from engine.store.db import Store
from engine.store.spool import sync_directory
from engine.store.tables import Base, Delivery, DeliveryAttempt, Message

log = logging.getLogger(__name__)

MESSAGE, DELIVERY, ATTEMPT = Message.__table__, Delivery.__table__, DeliveryAttempt.__table__
PENDING = ("queued", "error")  # not yet sent, not given up: the dispatcher still needs the row
SPOOLED = "dicom-file"  # a delivery whose payload is the path of its spooled file (engine.store.spool)
T = TypeVar("T")
Write = Callable[[Callable[[Session], T]], T]


def _references(table_name: str, exclude: Iterable[str]) -> list[Column]:
    """Columns of other tables that point at `table_name`.id: rows there need the row they name."""
    skip = set(exclude)
    return [fk.parent for table in Base.metadata.sorted_tables if table.name not in skip
            for fk in table.foreign_keys if fk.column.table.name == table_name]


MESSAGE_REFERENCES = _references("message", ["delivery"])
DELIVERY_REFERENCES = _references("delivery", ["delivery_attempt"])


@dataclass
class ChannelCounts:
    """What one run did to one journal channel (a dry run: what it would do)."""

    messages: int = 0
    deliveries: int = 0
    attempts: int = 0
    files: int = 0  # spooled image files removed
    archived: int = 0  # messages written to the archive
    kept_pending: int = 0  # old enough, but a delivery is queued or retrying
    kept_referenced: int = 0  # old enough, but a domain row points at it


@dataclass
class PruneReport:
    dry_run: bool
    channels: dict[str, ChannelCounts] = field(default_factory=dict)
    archive_files: list[str] = field(default_factory=list)

    def total(self) -> ChannelCounts:
        total = ChannelCounts()
        for counts in self.channels.values():
            for name, value in asdict(counts).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = []
        for name, c in sorted(self.channels.items()):
            out.append(f"{name}: {verb} {c.messages} message(s), {c.deliveries} deliveries, {c.attempts} attempts, "
                       f"{c.files} spooled file(s); archived {c.archived}; kept {c.kept_pending} with queued "
                       f"deliveries, {c.kept_referenced} referenced")
        return out or ["no journal channel has a retention policy, or nothing is old enough"]


def policies(config: Config, journal_channels: Iterable[str]) -> dict[str, Retention]:
    """Each journal channel's retention: its own from channels.yaml, else engine.retention, else none."""
    own = {c.name: c.retention for c in config.channels}
    out = {}
    for name in journal_channels:
        policy = own.get(name) or config.engine.retention
        if policy is not None:
            out[name] = policy
    return out


def session_writer(store: Store) -> Write:
    """`write` for the command line: each job in a short transaction of its own."""
    def write(work):
        with store.session() as session:
            return work(session)

    return write


class Pruner:
    """One pass over every journal channel with a policy; call `run` from a thread (it blocks)."""

    def __init__(self, store: Store, data_dir: Path, config: Callable[[], Config], write: Write, *,
                 clock: Clock | None = None, batch: int | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.store, self.write = store, write
        self.stopping = stopping or threading.Event()  # set by `serve` at shutdown: ends the run between batches
        self.config = config  # read at each run: a reloaded channels.yaml applies to the next one
        self.archive_root = data_dir / "archive"
        self.spool_root = (data_dir / "store").resolve()
        self.clock = clock or Clock()
        self.batch = batch

    def run(self, *, dry_run: bool = False) -> PruneReport:
        report = PruneReport(dry_run)
        config = self.config()
        batch = self.batch or config.engine.prune_batch
        with self.store.session() as session:
            names = list(session.scalars(select(MESSAGE.c.channel).distinct()))
        now = self.clock.utcnow()
        for name, policy in sorted(policies(config, names).items()):
            counts = report.channels.setdefault(name, ChannelCounts())
            self._channel(name, policy, now, batch, counts, report, dry_run)
        total = report.total()
        if total.messages or total.kept_pending or total.kept_referenced:
            log.info("journal pruned" if not dry_run else "journal prune (dry run)", extra={
                "messages": total.messages, "deliveries": total.deliveries, "files": total.files,
                "archived": total.archived, "kept_pending": total.kept_pending,
                "kept_referenced": total.kept_referenced})
        return report

    # --- one channel ----------------------------------------------------------------------------------------

    def _channel(self, name: str, policy: Retention, now: datetime, batch: int, counts: ChannelCounts,
                 report: PruneReport, dry_run: bool) -> None:
        cutoff = now - timedelta(days=policy.days)
        error_cutoff = now - timedelta(days=policy.keep_errors_days or policy.days)
        newest = max(cutoff, error_cutoff)
        after: tuple[datetime, int] | None = None
        while not self.stopping.is_set():
            rows, deliveries, attempts, referenced = self._read(name, newest, after, batch)
            if not rows:
                return
            after = (rows[-1]["received_at"], rows[-1]["id"])
            due = []
            for row in rows:
                mine = deliveries.get(row["id"], [])
                if any(d["status"] in PENDING for d in mine):
                    counts.kept_pending += 1
                    continue
                if row["id"] in referenced:
                    counts.kept_referenced += 1
                    continue
                failed = row["status"] == "error" or any(d["status"] == "dead" for d in mine)
                if _naive(row["received_at"]) < _naive(error_cutoff if failed else cutoff):
                    due.append(row)
            if not due:
                continue
            if dry_run:
                counts.messages += len(due)
                counts.deliveries += sum(len(deliveries.get(r["id"], [])) for r in due)
                counts.attempts += sum(len(attempts.get(d["id"], [])) for r in due
                                       for d in deliveries.get(r["id"], []))
                counts.files += sum(1 for r in due for d in deliveries.get(r["id"], []) if self._spooled(d))
                continue
            if policy.archive:
                paths = self._archive(name, due, deliveries, attempts)
                report.archive_files += [str(p) for p in paths]
            removed = self.write(_delete_job([r["id"] for r in due]))
            gone = set(removed["messages"])
            counts.messages += len(gone)
            counts.deliveries += removed["deliveries"]
            counts.attempts += removed["attempts"]
            counts.kept_pending += len(due) - len(gone)  # requeued between the read and the delete
            if policy.archive:
                counts.archived += len(gone)
            counts.files += self._unlink([Path(p) for p in removed["files"]])

    def _read(self, name: str, newest: datetime, after: tuple[datetime, int] | None, batch: int):
        """The next batch of old messages of a channel, with their deliveries, attempts and references."""
        m = MESSAGE.c
        query = select(MESSAGE).where(m.channel == name, m.received_at < newest)
        if after is not None:
            query = query.where(or_(m.received_at > after[0], and_(m.received_at == after[0], m.id > after[1])))
        # (channel, received_at) is an index, the rowid its tail: the batches come off it in order, unsorted.
        query = query.order_by(m.received_at, m.id).limit(batch)
        with self.store.session() as session:
            connection = session.connection()
            rows = [dict(r._mapping) for r in connection.execute(query)]
            ids = [r["id"] for r in rows]
            deliveries: dict[int, list[dict]] = defaultdict(list)
            attempts: dict[int, list[dict]] = defaultdict(list)
            referenced: set[int] = set()
            if not ids:
                return rows, deliveries, attempts, referenced
            for d in connection.execute(select(DELIVERY).where(DELIVERY.c.message_id.in_(ids))
                                        .order_by(DELIVERY.c.id)):
                deliveries[d.message_id].append(dict(d._mapping))
            delivery_ids = [d["id"] for ds in deliveries.values() for d in ds]
            for chunk in _chunks(delivery_ids, 500):
                for a in connection.execute(select(ATTEMPT).where(ATTEMPT.c.delivery_id.in_(chunk))
                                            .order_by(ATTEMPT.c.id)):
                    attempts[a.delivery_id].append(dict(a._mapping))
            for column in MESSAGE_REFERENCES:
                referenced.update(connection.scalars(select(column).where(column.in_(ids)).distinct()))
            for column in DELIVERY_REFERENCES:
                held = set(connection.scalars(select(column).where(column.in_(delivery_ids)).distinct()))
                referenced.update(mid for mid, ds in deliveries.items() if any(d["id"] in held for d in ds))
        return rows, deliveries, attempts, referenced

    # --- archive and files ----------------------------------------------------------------------------------

    def _archive(self, name: str, rows: list[dict], deliveries: Mapping[int, list[dict]],
                 attempts: Mapping[int, list[dict]]) -> list[Path]:
        """One gzip JSON-lines file per received day; written, synced and renamed before any delete."""
        by_day: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_day[_naive(row["received_at"]).strftime("%Y%m%d")].append(row)
        paths = []
        for day, day_rows in sorted(by_day.items()):
            directory = self.archive_root / _safe(name) / day
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"journal-{day_rows[0]['id']}-{day_rows[-1]['id']}.jsonl.gz"
            lines = []
            for row in day_rows:
                record = _plain(row)
                record["deliveries"] = []
                for d in deliveries.get(row["id"], []):
                    item = _plain(d)
                    item["attempt_log"] = [_plain(a) for a in attempts.get(d["id"], [])]
                    if d["status"] == "dead" and self._spooled(d):
                        # never delivered anywhere: the archive is the only copy left of the image
                        data = _read_file(Path(d["payload"].decode("utf-8", "replace")))
                        if data is not None:
                            item["spooled_file"] = {"base64": base64.b64encode(data).decode("ascii")}
                    record["deliveries"].append(item)
                lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            fd, temporary = tempfile.mkstemp(prefix=".journal-", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
                    out.write(("\n".join(lines) + "\n").encode("utf-8"))
                    out.flush()
                    raw.flush()
                    os.fsync(raw.fileno())
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            sync_directory(directory)
            paths.append(path)
        return paths

    def _spooled(self, delivery: dict) -> bool:
        return delivery["content_type"] == SPOOLED and self._in_spool(delivery["payload"])

    def _in_spool(self, payload: bytes) -> bool:
        # The path comes from the database: only files under the spool directory are ever read or removed.
        try:
            return Path(payload.decode("utf-8")).resolve().is_relative_to(self.spool_root)
        except (UnicodeDecodeError, ValueError, OSError):
            return False

    def _unlink(self, paths: list[Path]) -> int:
        removed = 0
        for path in paths:
            if not self._in_spool(str(path).encode("utf-8")):
                continue
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass  # a sent delivery's link went when it was sent (keep_sent_files: false)
        return removed


def _delete_job(ids: list[int]) -> Callable[[Session], dict[str, Any]]:
    """The delete as one writer job: re-checks pending deliveries and references in its own transaction."""

    def work(session: Session) -> dict[str, Any]:
        with session.begin_nested():  # a failure leaves the writer's batch usable (JournalWriter.submit)
            connection = session.connection()
            pending = set(connection.scalars(select(DELIVERY.c.message_id).where(
                DELIVERY.c.message_id.in_(ids), DELIVERY.c.status.in_(PENDING))))
            for column in MESSAGE_REFERENCES:
                pending.update(connection.scalars(select(column).where(column.in_(ids))))
            safe = [i for i in ids if i not in pending]
            rows = connection.execute(select(DELIVERY.c.id, DELIVERY.c.content_type, DELIVERY.c.payload)
                                      .where(DELIVERY.c.message_id.in_(safe))).all() if safe else []
            delivery_ids = [r.id for r in rows]
            for column in DELIVERY_REFERENCES:
                held = set(connection.scalars(select(column).where(column.in_(delivery_ids))))
                if held:  # a new table pointing at deliveries: keep their messages whole
                    keep = set(connection.scalars(select(DELIVERY.c.message_id).where(DELIVERY.c.id.in_(held))))
                    safe = [i for i in safe if i not in keep]
                    rows = [r for r in rows if r.id not in held]
                    delivery_ids = [r.id for r in rows]
            attempts = 0
            for chunk in _chunks(delivery_ids, 500):
                attempts += connection.execute(delete(ATTEMPT).where(ATTEMPT.c.delivery_id.in_(chunk))).rowcount
                connection.execute(delete(DELIVERY).where(DELIVERY.c.id.in_(chunk)))
            if safe:
                connection.execute(delete(MESSAGE).where(MESSAGE.c.id.in_(safe)))
        files = [r.payload.decode("utf-8", "replace") for r in rows if r.content_type == SPOOLED]
        return {"messages": safe, "deliveries": len(delivery_ids), "attempts": attempts, "files": files}

    return work


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            out[key] = {"base64": base64.b64encode(bytes(value)).decode("ascii")}
        elif isinstance(value, datetime):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out


def read_archive(path: Path) -> list[dict[str, Any]]:
    """The records of one archive file, bytes decoded back from base64 (raw, payload, spooled_file)."""
    def unplain(value):
        if isinstance(value, dict) and set(value) == {"base64"}:
            return base64.b64decode(value["base64"])
        if isinstance(value, dict):
            return {k: unplain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unplain(v) for v in value]
        return value

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [unplain(json.loads(line)) for line in f if line.strip()]


def _naive(value: datetime) -> datetime:
    """UTC without tzinfo: SQLite gives back naive datetimes (stored as UTC), PostgreSQL aware ones."""
    return value if value.tzinfo is None else value.astimezone(timezone.utc).replace(tzinfo=None)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "_"


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
