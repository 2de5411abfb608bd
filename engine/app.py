"""Assembles the Engine for `serve`: actors and services each capability contributes."""

from __future__ import annotations

from pathlib import Path

from engine.actors.order_filler import OrderFiller
from engine.channels.runtime import Engine
from engine.clock import Clock, Ids
from engine.config import Config
from engine.http_api import start_http_server
from engine.mwl.dicom_server import start_dicom_server
from engine.store.db import Store


def build_engine(config: Config, store: Store, data_dir: Path, *, clock: Clock | None = None) -> Engine:
    clock = clock or Clock()
    ids = Ids(config.engine.uid_root)
    return Engine(config=config, store=store, clock=clock, ids=ids, data_dir=data_dir,
                  actors={"order_filler": OrderFiller()},
                  actor_settings={"order_filler": config.worklist},
                  services=[start_dicom_server, start_http_server])
