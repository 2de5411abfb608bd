"""Assembles the Engine for `serve`: actors and services each capability contributes."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

from engine.actors.order_filler import OrderFiller
from engine.actors.report_manager import ReportManager
from engine.channels.retention import start_pruner
from engine.channels.runtime import Engine
from engine.clock import Clock, Ids
from engine.config import Config
from engine.http_access import CLOSED, PeopleAccess
from engine.http_api import ROUTERS, RouterFactory, start_http_server
from engine.mwl.dicom_server import start_dicom_server
from engine.non_dicom_capture.service import start_capture
from engine.store.db import Store


def build_engine(config: Config, store: Store, data_dir: Path, *, clock: Clock | None = None,
                 config_path: Path | None = None, http_routers: Sequence[RouterFactory] | None = None,
                 http_people: PeopleAccess = CLOSED) -> Engine:
    """`http_routers`: the HTTP listener's routers when not ROUTERS (`serve` adds the admin UI's, a floor above);
    `http_people`: the guards of the routes people use (the admin UI's logins), else those stay closed."""
    clock = clock or Clock()
    ids = Ids(config.engine.uid_root)
    reports = ReportManager(config.reports, {c.name: c for c in config.channels})
    engine = Engine(config=config, store=store, clock=clock, ids=ids, data_dir=data_dir,
                    actors={"order_filler": OrderFiller(), "report_manager": reports},
                    actor_settings={"order_filler": config.worklist},
                    services=[start_dicom_server, start_capture, start_pruner,
                              partial(start_http_server, routers=http_routers or ROUTERS, people=http_people)],
                    config_path=config_path)
    reports.follow(lambda: engine.pipelines.channels)  # a reloaded channel's destinations apply to the next report
    return engine
