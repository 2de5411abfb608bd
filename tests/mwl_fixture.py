"""Worklist fixture shared by the test_mwl_* modules (holds no tests): 240+ steps written straight into the store.

Patients with Chinese names (shared/data/names.tsv), Latin names and one name whose GB18030 bytes hold a
backslash; 12 station AEs over 7 modalities; dates over four months with a crowd around TODAY; all step
statuses; a few orders with two steps. `expected` computes answers in plain Python from these rows.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable

from engine.mappings.pinyin import NameReading, alphabetic_name
from engine.store.db import Store
from engine.store.tables import ImagingOrder, Patient, ScheduledStep

NAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "names.tsv"
TODAY = "20261122"
HIDDEN = {"STARTED", "COMPLETED", "DISCONTINUED", "CANCELLED"}
STATIONS = {"CT01": "CT", "CT02": "CT", "CT03": "CT", "MR01": "MR", "MR02": "MR", "US01": "US", "US02": "US",
            "DX01": "DX", "DX02": "DX", "MG01": "MG", "XA01": "XA", "ES01": "ES"}
PROCEDURES = {
    "CT": [("CT0101", "胸部CT平扫"), ("CT0203", "头颅CT增强"), ("CT9001", "CT Chest without contrast")],
    "MR": [("MR0301", "头颅MRI平扫"), ("MR0410", "腰椎MRI（增强）")],
    "US": [("US0101", "腹部彩超")],
    "DX": [("DX0101", "胸部正位片"), ("DX0102", "Chest PA")],
    "MG": [("MG0101", "乳腺钼靶")],
    "XA": [("XA0101", "冠状动脉造影")],
    "ES": [("ES0101", "胃镜检查")],
}
STATUSES = ["SCHEDULED"] * 12 + ["ARRIVED", "READY"] * 2 + ["STARTED", "COMPLETED", "COMPLETED",
                                                             "DISCONTINUED", "CANCELLED"]
PHYSICIANS = ["张^伟", "LI^MING", "", "Müller^Hans", "王^医生"]


@dataclass(frozen=True)
class Row:
    """One fixture step with the facts the tests reason about."""

    accession: str
    step_id: str
    patient_id: str
    issuer: str
    family: str
    given: str
    family_pinyin: str
    given_pinyin: str
    latin: bool
    birth_date: str
    sex: str
    station: str
    modality: str
    start_date: str
    start_time: str
    status: str
    study_uid: str
    priority: str
    procedure_code: str
    procedure_meaning: str
    referring: str

    @property
    def alphabetic(self) -> str:
        reading = NameReading(self.family, self.given, self.family_pinyin, self.given_pinyin, latin=self.latin)
        return alphabetic_name(reading)

    @property
    def ideographic(self) -> str:
        return "" if self.latin else f"{self.family}^{self.given}"

    @property
    def key(self) -> tuple[str, str]:
        return self.accession, self.step_id


def patients() -> list[tuple[str, str, str, str, bool]]:
    """(family, given, family_pinyin, given_pinyin, latin) from names.tsv, plus names the tests need."""
    people = [("王", "小东", "wang", "xiaodong", False), ("陈", "昞", "chen", "bing", False),
              ("Müller", "Hans", "muller", "hans", True)]
    with NAMES.open(encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            latin = row["hanzi"].isascii()
            people.append((row["family_hanzi"], row["given_hanzi"], row["family_pinyin"], row["given_pinyin"], latin))
    return people


def build_rows(count: int = 240, seed: int = 20261122) -> list[Row]:
    rng = random.Random(seed)
    people = patients()
    today = date(2026, 11, 22)
    rows: list[Row] = []
    for i in range(count):
        p = i % len(people)
        family, given, fp, gp, latin = people[p]
        station = rng.choice(sorted(STATIONS))
        modality = STATIONS[station]
        roll = rng.random()
        offset = 0 if roll < 0.35 else rng.choice([-1, 1]) if roll < 0.55 else rng.randint(-75, 50)
        day = today + timedelta(days=offset)
        code, meaning = rng.choice(PROCEDURES[modality])
        priority = rng.choice("RRRRSA")
        accession = f"ACC{i:05d}"
        steps = 2 if i % 25 == 7 else 1  # a few orders with two steps
        for n in range(steps):
            rows.append(Row(
                accession=accession, step_id=f"SPS{i:05d}{n}", patient_id=f"P{p:04d}",
                issuer="HOSP" if i % 9 else "CLINIC", family=family, given=given, family_pinyin=fp,
                given_pinyin=gp, latin=latin, birth_date=f"{1940 + p}{1 + p % 12:02d}{1 + p % 28:02d}",
                sex="MF"[p % 2], station=station if n == 0 else "CT03", modality=modality if n == 0 else "CT",
                start_date=day.strftime("%Y%m%d"), start_time=f"{rng.randrange(24):02d}{rng.randrange(0, 60, 5):02d}00",
                status=rng.choice(STATUSES), study_uid=f"1.2.826.0.1.3680043.10.543.{i}",
                priority=priority, procedure_code=code, procedure_meaning=meaning,
                referring=PHYSICIANS[i % len(PHYSICIANS)]))
    # Literal % and _ in values: a wildcard must not treat them as SQL wildcards.
    for accession in ("Q_1", "QX1", "Q%2", "QY2"):
        rows.append(Row(accession=accession, step_id=f"SPS{accession}", patient_id="P9999", issuer="HOSP",
                        family="Smith", given="John", family_pinyin="smith", given_pinyin="john", latin=True,
                        birth_date="19700101", sex="M", station="DX02", modality="DX", start_date="20261123",
                        start_time="101500", status="SCHEDULED", study_uid=f"1.2.3.{len(rows)}", priority="R",
                        procedure_code="DX0102", procedure_meaning="Chest PA", referring=""))
    return rows


def load(store: Store, rows: Iterable[Row]) -> None:
    """Write the rows through the ORM, one patient per (patient_id, issuer), one order per accession."""
    now = datetime(2026, 11, 1, tzinfo=timezone.utc)
    with store.session() as session:
        patients_by_key: dict[tuple[str, str], Patient] = {}
        orders: dict[str, ImagingOrder] = {}
        for row in rows:
            patient = patients_by_key.get((row.patient_id, row.issuer))
            if patient is None:
                patient = Patient(patient_id=row.patient_id, issuer=row.issuer, family_name=row.family,
                                  given_name=row.given, family_pinyin=row.family_pinyin,
                                  given_pinyin=row.given_pinyin, name_is_latin=row.latin,
                                  name_alphabetic=row.alphabetic.upper(), name_ideographic=row.ideographic,
                                  birth_date=row.birth_date, sex=row.sex, updated_at=now)
                session.add(patient)
                patients_by_key[(row.patient_id, row.issuer)] = patient
            order = orders.get(row.accession)
            if order is None:
                order = ImagingOrder(patient=patient, placer_number=f"PL{row.accession}",
                                     filler_number=f"FL{row.accession}", accession=row.accession,
                                     requested_procedure_id=f"RP{row.accession[-4:]}",
                                     procedure_code=row.procedure_code, procedure_scheme="99HIS",
                                     procedure_meaning=row.procedure_meaning, study_instance_uid=row.study_uid,
                                     priority=row.priority, referring_physician=row.referring,
                                     reason="咳嗽两周", department="放射科", patient_location="门诊", admission_id=f"V{row.accession[-4:]}",
                                     created_at=now, updated_at=now)
                session.add(order)
                orders[row.accession] = order
            session.add(ScheduledStep(order=order, step_id=row.step_id, modality=row.modality,
                                      station_aet=row.station, station_name=f"{row.station}_ROOM",
                                      location="一楼CT室" if row.modality == "CT" else "2F",
                                      start_date=row.start_date, start_time=row.start_time,
                                      description="" if row.step_id.endswith("1") else row.procedure_meaning,
                                      performing_physician="", status=row.status, updated_at=now))


def expected(rows: Iterable[Row], predicate: Callable[[Row], bool], *, show_hidden: bool = False) -> list[tuple]:
    """Sorted (accession, step id) of the rows a query must return, hidden statuses left out unless asked."""
    return sorted(r.key for r in rows if predicate(r) and (show_hidden or r.status not in HIDDEN))
