"""/healthz for load balancers and /metrics for Prometheus: no login, no patient data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text

from engine import __version__
from engine.store.tables import Delivery, Message

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

STATES = ("started", "paused", "stopped")


class JournalCollector:
    """Reads the counts from the journal at scrape time: they survive restarts, as Prometheus counters should."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine

    def collect(self):
        engine = self.engine
        messages = CounterMetricFamily("swf_messages", "Messages journaled, by channel and status",
                                       labels=["channel", "status"])
        deliveries = GaugeMetricFamily("swf_deliveries", "Deliveries by channel, destination and status",
                                       labels=["channel", "destination", "status"])
        with engine.store.sessions() as session:
            for channel, status, count in session.execute(
                    select(Message.channel, Message.status, func.count()).group_by(Message.channel, Message.status)):
                messages.add_metric([channel, status], count)
            for channel, destination, status, count in session.execute(
                    select(Delivery.channel, Delivery.destination, Delivery.status, func.count())
                    .group_by(Delivery.channel, Delivery.destination, Delivery.status)):
                deliveries.add_metric([channel, destination, status], count)
        yield messages
        yield deliveries
        state = GaugeMetricFamily("swf_channel_state", "1 for the channel's current state", labels=["channel", "state"])
        for channel, current in sorted(engine.channel_state.items()):
            for name in STATES:
                state.add_metric([channel, name], 1.0 if current == name else 0.0)
        yield state
        commits = CounterMetricFamily("swf_journal_commits", "Journal writer commits since start")
        commits.add_metric([], engine.writer.batches)
        yield commits
        jobs = CounterMetricFamily("swf_journal_jobs", "Journal writer jobs (messages, deliveries, audit) since start")
        jobs.add_metric([], engine.writer.jobs)
        yield jobs
        info = GaugeMetricFamily("swf_engine_info", "Engine version", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info


def ops_router(engine: "Engine") -> APIRouter:
    router = APIRouter(tags=["operations"])
    registry = CollectorRegistry(auto_describe=False)  # per app: never the process-global default registry
    registry.register(JournalCollector(engine))

    @router.get("/healthz", summary="Liveness and readiness: database reachable, journal writer running")
    def healthz(response: Response) -> dict:
        checks = {"journal_writer": "ok" if engine.writer._thread.is_alive() else "stopped"}
        try:
            with engine.store.sessions() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # any driver error means not ready
            checks["database"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        response.status_code = 200 if ok else 503
        return {"status": "ok" if ok else "unavailable", "version": __version__, "checks": checks,
                "channels": dict(engine.channel_state)}

    @router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
