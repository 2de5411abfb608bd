"""Reload without restart: which parts of a new, valid channels file the running engine can take on the spot.

A channel whose source runs in the engine's own loop (MLLP listener, internal queue) is stopped and started
with its new definition; its journal and queued deliveries stay. What other services captured when they
started (the DICOM and HTTP listeners, the FHIR routes, the MPPS status channel, the worklist settings the
actors got) keeps the running value until `serve` restarts: the report names each such change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import Channel, Config, DicomSource, FhirSource, RestSource

# top-level sections only services read at start
RESTART_SECTIONS = ("engine", "dicom", "http", "worklist", "mpps", "reports")


@dataclass
class ReloadReport:
    applied: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    unchanged: bool = False


@dataclass
class ReloadPlan:
    applied: Config  # the config the engine runs after the reload: new channels, old values where restart waits
    stop: list[str]  # channels to stop (changed or removed)
    start: list[str]  # channels to start (changed or added)
    report: ReloadReport


def _restart_only(channel: Channel) -> bool:
    """Sources served by listeners built at start: their routes and SCP handlers hold the old definition."""
    return isinstance(channel.source, (FhirSource, DicomSource, RestSource))


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    report = ReloadReport()
    kept_sections = {}
    for section in RESTART_SECTIONS:
        if getattr(old, section) != getattr(new, section):
            kept_sections[section] = getattr(old, section)
            report.needs_restart.append(f"{section}: settings changed (restart to apply)")
    old_channels = {c.name: c for c in old.channels}
    new_channels = {c.name: c for c in new.channels}
    stop, start = [], []
    channels: list[Channel] = []
    status_channel = old.mpps.status_channel
    for name, channel in new_channels.items():
        before = old_channels.get(name)
        if before == channel:
            channels.append(channel)
            continue
        if (before is not None and _restart_only(before)) or _restart_only(channel):
            report.needs_restart.append(f"channel {name}: {channel.source.type} source changes apply at restart")
            if before is not None:
                channels.append(before)
            continue
        if name == status_channel and before is not None and \
                [d.name for d in before.destinations] != [d.name for d in channel.destinations]:
            report.needs_restart.append(f"channel {name}: MPPS status destinations change at restart")
            channels.append(before)
            continue
        if before is not None:
            stop.append(name)
            report.applied.append(f"channel {name}: restarted with its new definition")
        else:
            report.applied.append(f"channel {name}: added and started")
        start.append(name)
        channels.append(channel)
    for name, before in old_channels.items():
        if name in new_channels:
            continue
        if _restart_only(before) or name == status_channel:
            report.needs_restart.append(f"channel {name}: removal applies at restart")
            channels.append(before)
        else:
            stop.append(name)
            report.applied.append(f"channel {name}: removed (stopped; its journal stays)")
    report.unchanged = not report.applied and not report.needs_restart
    applied = new.model_copy(update={"channels": channels, **kept_sections})
    return ReloadPlan(applied=applied, stop=stop, start=start, report=report)
