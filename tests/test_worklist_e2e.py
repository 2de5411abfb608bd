"""Orders to the worklist end to end: HIS over MLLP into `swf-engine serve`, DCMTK findscu as the modality (issue 3).

Acceptance lines 1, 2, 3, 5 and 7. One engine for the module, started as an operator starts it: the shipped
channels.yaml, every endpoint on a free port, a fresh SWF_DATA_DIR. The HIS is a real MLLP socket; the modality is
DCMTK `findscu -W` (a real process).

- The story of shared/data/hl7 is driven by its index.tsv: every ADT/ORM/OMG row is sent in file order and its
  facts are checked within 1 s of the AA: the columns (patient id, accession, modality, start, name) and what the
  `expect` column says (removed entries, moved times, explicit names, merges, an unchanged worklist). Around every
  row the whole worklist is read before and after: entries the row does not concern must not change.
- The other tests rekey the same files (control ids, patient ids, order numbers, accessions of their own) so they
  never touch the story and run in any order; their templates are chosen from index.tsv by kind, not by file name.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from engine.config import Config, load_config
from peers import HL7_DIR, REPO, EngineProcess, FindResult, dcmtk_tool, findscu, free_port, mllp_exchange

FINDSCU = dcmtk_tool("findscu")
pytestmark = [pytest.mark.slow, pytest.mark.dcmtk,
              pytest.mark.skipif(not FINDSCU, reason="DCMTK findscu not on PATH (pynetdicom's findscu does not count)")]

CONFIG_FILE = REPO / "channels.yaml"
with open(HL7_DIR / "index.tsv", encoding="utf-8", newline="") as _f:
    ROWS = list(csv.DictReader(_f, delimiter="\t", quoting=csv.QUOTE_NONE))
STORY = [r for r in ROWS if r["message_type"] in ("ADT", "ORM", "OMG")]
ACCESSIONS = {r["accession"] for r in ROWS if r["accession"]}
PATIENT_IDS = {r["patient_id"] for r in ROWS if r["patient_id"]}

REGISTER, UPDATE, MERGE = {"A01", "A04", "A05", "A28"}, {"A08", "A31"}, {"A40", "A34"}
REMOVE = {"CA": "CANCELLED", "DC": "DISCONTINUED"}
STATUS_ONLY = {"SC", "OC", "OK", "CR", "DR", "XR"}  # reported by another system: the worklist does not change
HL7_PRIORITY = {"S": "STAT", "A": "HIGH", "P": "HIGH", "T": "HIGH", "C": "MEDIUM", "R": "ROUTINE"}  # table 0027
WITHIN = 1.0  # seconds from the AA to a worklist that shows the message's facts (CONTRACT.md 1)


def sps(key: str) -> str:
    return f"ScheduledProcedureStepSequence[0].{key}"


RETURN_KEYS = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "CurrentPatientLocation",
    "AdmissionID",
    "AccessionNumber", "ReferringPhysicianName", "RequestingService", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "RequestedProcedureID", "RequestedProcedureDescription",
    "ReasonForTheRequestedProcedure", "RequestedProcedureCodeSequence", "StudyInstanceUID",
    "RequestedProcedurePriority",
    *(sps(k) for k in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                       "ScheduledProcedureStepStartTime", "ScheduledPerformingPhysicianName",
                       "ScheduledProcedureStepDescription", "ScheduledStationName", "ScheduledProcedureStepLocation",
                       "ScheduledProtocolCodeSequence", "ScheduledProcedureStepID", "ScheduledProcedureStepStatus")),
]


# --- HL7 messages as text, edited by location ----------------------------------------------------


def codec(row: dict) -> str:
    return {"utf-8": "utf-8", "gb18030": "gb18030", "ascii": "ascii"}.get(row["charset"].lower(), row["charset"])


class Msg:
    """One HL7 v2 message as segments of fields; `set("OBR-18", v)` edits every segment of that name."""

    def __init__(self, text: str) -> None:
        self.segments = [s.split("|") for s in text.replace("\n", "\r").split("\r") if s]

    @classmethod
    def of(cls, row: dict) -> "Msg":
        return cls((HL7_DIR / row["file"]).read_bytes().decode(codec(row)))

    @staticmethod
    def _index(segment: str, number: int) -> int:
        return number - 1 if segment == "MSH" else number  # MSH-1 is the field separator itself

    def _where(self, location: str) -> tuple[str, int, int | None]:
        match = re.fullmatch(r"([A-Z0-9]{3})-(\d+)(?:\.(\d+))?", location)
        assert match, location
        return match[1], self._index(match[1], int(match[2])), int(match[3]) if match[3] else None

    def has(self, segment: str) -> bool:
        return any(s[0] == segment for s in self.segments)

    def get(self, location: str) -> str:
        name, index, component = self._where(location)
        for fields in self.segments:
            if fields[0] == name:
                value = fields[index] if index < len(fields) else ""
                if component is None:
                    return value
                parts = value.split("~")[0].split("^")
                return parts[component - 1] if len(parts) >= component else ""
        return ""

    def set(self, location: str, value: str) -> "Msg":
        name, index, component = self._where(location)
        for fields in self.segments:
            if fields[0] != name:
                continue
            fields.extend([""] * (index + 1 - len(fields)))
            if component is None:
                fields[index] = value
            else:
                reps = fields[index].split("~")
                parts = reps[0].split("^")
                parts.extend([""] * (component - len(parts)))
                parts[component - 1] = value
                fields[index] = "~".join(["^".join(parts).rstrip("^"), *reps[1:]])
        return self

    def replace_id(self, location: str, old: str, new: str) -> "Msg":
        """CX.1 of every repetition holding `old` (PID-3, MRG-1): other identifiers of the patient stay."""
        name, index, _ = self._where(location)
        for fields in self.segments:
            if fields[0] == name and index < len(fields):
                reps = [rep.split("^") for rep in fields[index].split("~")]
                for rep in reps:
                    if rep[0] == old:
                        rep[0] = new
                fields[index] = "~".join("^".join(rep) for rep in reps)
        return self

    def text(self) -> str:
        return "\r".join("|".join(fields) for fields in self.segments) + "\r"

    def encode(self, charset: str = "UNICODE UTF-8") -> bytes:
        """Bytes in that charset, MSH-18 saying so (HL7 table 0211)."""
        self.set("MSH-18", charset)
        return self.text().encode({"UNICODE UTF-8": "utf-8", "GB 18030-2000": "gb18030"}[charset])


_numbers = itertools.count(1)


@dataclass(frozen=True)
class Keys:
    """The identifiers a rekeyed order uses instead of the file's."""

    n: int
    patient_id: str

    @property
    def accession(self) -> str:
        return f"E2E{self.n:05d}"

    def order_ids(self) -> dict[str, str]:
        n = self.n
        return {"OBR-18": self.accession, "ORC-2.1": f"EP{n:05d}", "OBR-2.1": f"EP{n:05d}",
                "ORC-3.1": f"EF{n:05d}", "OBR-3.1": f"EF{n:05d}", "OBR-19": f"ER{n:05d}", "OBR-20": f"ES{n:05d}"}


def fresh_patient() -> str:
    return f"9{next(_numbers):05d}"


def rekey(row: dict, patient_id: str, keys: Keys | None = None, *, prior_id: str | None = None) -> Msg:
    """The row's message with a control id, patient id and (for orders) order numbers of this test's own."""
    msg = Msg.of(row)
    msg.set("MSH-10", f"E2E{next(_numbers):06d}")
    msg.replace_id("PID-3", row["patient_id"], patient_id)
    if prior_id is not None:
        msg.replace_id("MRG-1", msg.get("MRG-1.1"), prior_id)
    if keys is not None:
        for location, value in keys.order_ids().items():
            if msg.get(location) or location == "OBR-18":
                msg.set(location, value)
        if msg.get("ZDS-1.1"):
            msg.set("ZDS-1.1", f"2.25.{4_000_000 + keys.n}")  # a Study Instance UID of its own
    return msg


# --- what the index says a modality must show ------------------------------------------------------


def syllables(pinyin: str) -> int:
    """Pinyin syllables of a surname: one vowel group each (ouyang 2, zhuge 2, lv 1)."""
    return max(1, len(re.findall(r"[aeiouv]+", pinyin)))


def latin(row: dict) -> bool:
    return row["hanzi"].isascii()


def ideographic(row: dict) -> str:
    """The ideographic group `family^given` from the hanzi column (data/README.md conventions 1 and 4)."""
    hanzi = row["hanzi"]
    if latin(row):
        return ""
    if "^" in hanzi:  # already split by the HIS
        return "^".join(hanzi.split("^")[:2]).rstrip("^")
    if "·" in hanzi:  # personal name · father's name: the father's name is the family part
        given, family = hanzi.split("·", 1)
        return f"{family}^{given}"
    n = syllables(row["family_pinyin"])
    return f"{hanzi[:n]}^{hanzi[n:]}"


def alphabetic(row: dict, config: Config) -> str:
    """The alphabetic group as the shipped `worklist.names` presents it (case; ü written per `umlaut`)."""
    names = config.worklist.names
    parts = [row["family_pinyin"], row["given_pinyin"]]
    if not latin(row):
        parts = [p.replace("v", {"v": "v", "u": "u", "yu": "yu"}[names.umlaut]) for p in parts]
    parts = [{"upper": str.upper, "lower": str.lower, "title": str.capitalize}[names.case](p) for p in parts]
    return "^".join(parts).rstrip("^")


def person_name(row: dict, config: Config) -> str:
    group = ideographic(row)
    return alphabetic(row, config) + (f"={group}" if group else "")


def station_for(config: Config, modality: str) -> str | None:
    """The station AE the shipped table gives by modality alone; None when a rule needs more than the index has."""
    for rule in config.worklist.stations:
        if rule.modality and rule.modality.upper() != modality.upper():
            continue
        if rule.procedure_code or rule.department:
            return None
        return rule.ae_titles[0]
    return ""


# --- the engine and the modality -------------------------------------------------------------------


@dataclass
class Ack:
    code: str
    control_id: str  # MSA-2
    version: str
    err: list[str]  # the ERR segment's fields, [] when none
    text: str
    at: float  # time.monotonic() when it arrived

    def error_location(self) -> str:
        """ERR-2 (v2.5+) or the location part of ERR-1 (ELD, v2.3.1/2.4) as SEG^seq^field."""
        assert self.err, f"no ERR segment in {self.text!r}"
        if version_at_least(self.version, 2, 5):
            return self.err[2] if len(self.err) > 2 else ""
        return "^".join(self.err[1].split("^")[:3])

    def error_code(self) -> str:
        """ERR-3.1 (v2.5+) or ERR-1.4.1 (v2.3.1/2.4): HL7 table 0357."""
        if version_at_least(self.version, 2, 5):
            return self.err[3].split("^")[0] if len(self.err) > 3 else ""
        parts = self.err[1].split("^")
        return parts[3].split("&")[0] if len(parts) > 3 else ""


def version_at_least(version: str, major: int, minor: int) -> bool:
    numbers = [int(x) for x in re.findall(r"\d+", version)[:2]] or [2, 5]
    return tuple(numbers) >= (major, minor)


@dataclass
class Engine:
    config: Config
    hl7_port: int
    dicom_port: int
    data_dir: Path
    tmp: Path
    process: EngineProcess

    def send(self, raw: bytes, text_codec: str = "utf-8") -> Ack:
        answer = mllp_exchange(self.hl7_port, raw)
        at = time.monotonic()
        text = answer.decode(text_codec, errors="replace")
        segments = {s[:3]: s.split("|") for s in text.split("\r") if s}
        msh, msa = segments.get("MSH", []), segments.get("MSA", [])
        assert msa, f"no MSA in {text!r}"
        return Ack(msa[1], msa[2] if len(msa) > 2 else "", msh[11] if len(msh) > 11 else "",
                   segments.get("ERR", []), text, at)

    def accept(self, msg: Msg, charset: str = "UNICODE UTF-8") -> Ack:
        ack = self.send(msg.encode(charset), {"UNICODE UTF-8": "utf-8", "GB 18030-2000": "gb18030"}[charset])
        assert (ack.code, ack.control_id) == ("AA", msg.get("MSH-10")), ack.text
        return ack

    def find(self, keys: list[str | bytes], *, aet: str = "MODALITY1") -> FindResult:
        result = findscu(self.dicom_port, self.tmp, [*keys, *RETURN_KEYS], aet=aet, aec=self.config.dicom.ae_title)
        assert result.status == 0x0000, result.detail[-1500:]
        return result

    def entries(self, *keys: str, aet: str = "MODALITY1") -> dict[tuple[str, str], dict[str, str]]:
        """Worklist entries (accession, step id) -> every attribute, for a query (no keys: the whole worklist)."""
        out = {}
        for ds in self.find(list(keys), aet=aet).responses:
            out[(ds.AccessionNumber, ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)] = flat(ds)
        return out

    def db(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.data_dir / "swf-engine.db") as db:
            return db.execute(sql, args).fetchall()

    def counts(self) -> tuple[int, ...]:
        return tuple(self.db(f"select count(*) from {t}")[0][0] for t in ("patient", "imaging_order", "scheduled_step"))


def flat(ds: Dataset, prefix: str = "", *, skip_uids: bool = False) -> dict[str, str]:
    """Every attribute as path -> text (sequence items by index)."""
    out: dict[str, str] = {}
    for element in ds:
        name = prefix + (element.keyword or str(element.tag))
        if element.VR == "SQ":
            out[name] = f"{len(element.value)} item(s)"
            for i, item in enumerate(element.value):
                out.update(flat(item, f"{name}[{i}].", skip_uids=skip_uids))
        elif not (skip_uids and element.VR == "UI"):
            out[name] = "" if element.value is None else str(element.value)
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    tmp = tmp_path_factory.mktemp("worklist_e2e")
    ports = {name: free_port() for name in ("SWF_HL7_PORT", "SWF_DICOM_PORT", "SWF_HTTP_PORT", "SWF_HIS_PORT",
                                            "SWF_PACS_PORT")}
    env = {name: str(port) for name, port in ports.items()}
    data_dir = tmp / "var"
    env["SWF_DATA_DIR"] = str(data_dir)
    config = load_config(CONFIG_FILE, {**os.environ, **env})
    process = EngineProcess(CONFIG_FILE, data_dir, [ports["SWF_HL7_PORT"], ports["SWF_DICOM_PORT"]], env=env)
    process.start()
    try:
        yield Engine(config, ports["SWF_HL7_PORT"], ports["SWF_DICOM_PORT"], data_dir, tmp, process)
    finally:
        process.stop()
    log = process.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def within(ack: Ack, check) -> None:
    """Run `check` until it passes; an attempt that starts later than WITHIN after the AA does not count."""
    while True:
        started = time.monotonic()
        try:
            check()
            break
        except AssertionError:
            if time.monotonic() - ack.at >= WITHIN:
                raise
            time.sleep(0.05)
    assert started - ack.at < WITHIN, f"facts visible only {started - ack.at:.2f} s after the AA"


# --- acceptance 1 and 3: the story of shared/data/hl7, row by row ------------------------------------


@dataclass
class Story:
    """Sends the story in file order; what is on the worklist, by accession, as the rows so far say."""

    engine: Engine
    sent: set[str] = field(default_factory=set)
    owner: dict[str, str] = field(default_factory=dict)  # active accession -> patient id
    wards: dict[str, str] = field(default_factory=dict)  # patient id -> ward an admission named

    def play(self, row: dict) -> None:
        position = STORY.index(row)
        if row["file"] in self.sent:
            pytest.fail(f"{row['file']} was already sent: the story runs once, in file order")
        for earlier in STORY[:position]:
            if earlier["file"] not in self.sent:  # a row run alone: what came before is sent unchecked
                ack = self.engine.send((HL7_DIR / earlier["file"]).read_bytes(), codec(earlier))
                assert ack.code == "AA", ack.text
                self.track(earlier)
        before = self.engine.entries()
        raw = (HL7_DIR / row["file"]).read_bytes()
        ack = self.engine.send(raw, codec(row))
        self.sent.add(row["file"])
        assert ack.code == "AA", ack.text
        assert ack.control_id == Msg.of(row).get("MSH-10"), "MSA-2 must echo MSH-10"
        within(ack, lambda: check_row(self, row, before))
        self.track(row)

    def track(self, row: dict) -> None:
        self.sent.add(row["file"])
        kind, control, accession = row["message_type"], row["order_control"], row["accession"]
        if kind == "ADT" and row["trigger"] in MERGE:
            prior = Msg.of(row).get("MRG-1.1")
            for acc, owner in list(self.owner.items()):
                if owner == prior:
                    self.owner[acc] = row["patient_id"]
        elif kind == "ADT":
            ward = re.search(r"\bward ([A-Za-z0-9]+)", row["expect"])
            if ward:
                self.wards[row["patient_id"]] = ward[1]
        elif control in ("NW", "XO"):
            self.owner[accession] = row["patient_id"]
        elif control in REMOVE:
            self.owner.pop(accession, None)


@pytest.fixture(scope="module")
def story(engine) -> Story:
    return Story(engine)


def journal(engine: Engine, row: dict) -> tuple:
    rows = engine.db("select charset, status, ack_code from message where control_id = ? order by id desc",
                     Msg.of(row).get("MSH-10"))
    assert rows, f"{row['file']} is not in the journal"
    return rows[0]


def patient_row(engine: Engine, patient_id: str) -> dict:
    found = engine.db("select id, family_name, given_name, family_pinyin, given_pinyin, name_ideographic, "
                      "merged_into_id from patient where patient_id = ?", patient_id)
    assert len(found) == 1, f"patient {patient_id}: {len(found)} rows"
    return dict(zip(("id", "family", "given", "family_pinyin", "given_pinyin", "ideographic", "merged_into"),
                    found[0]))


def assert_name_stored(engine: Engine, row: dict) -> None:
    stored = patient_row(engine, row["patient_id"])
    assert stored["merged_into"] is None
    assert (stored["family_pinyin"], stored["given_pinyin"]) == (row["family_pinyin"], row["given_pinyin"])
    if latin(row):
        assert "^".join((stored["family"], stored["given"])).rstrip("^") == row["hanzi"]
    else:
        assert stored["ideographic"] == ideographic(row)


def assert_entry(engine: Engine, entry: dict[str, str], row: dict) -> None:
    """One worklist entry shows the row's facts (default profile: ISO_IR 192, both name groups)."""
    config = engine.config
    assert entry["SpecificCharacterSet"] == "ISO_IR 192"
    assert entry["PatientID"] == row["patient_id"]
    assert entry["PatientName"] == person_name(row, config)
    if row["accession"]:
        assert entry["AccessionNumber"] == row["accession"]
    if row["modality"]:
        assert entry[sps("Modality")] == row["modality"]
        station = station_for(config, row["modality"])
        if station is not None:
            assert entry[sps("ScheduledStationAETitle")] == station
    if row["start"]:
        assert entry[sps("ScheduledProcedureStepStartDate")] == row["start"][:8]
        assert entry[sps("ScheduledProcedureStepStartTime")].ljust(6, "0")[:6] == row["start"][8:14].ljust(6, "0")
    assert entry[sps("ScheduledProcedureStepStatus")] == "SCHEDULED"


def others(entries: dict, *, accessions=(), patients=()) -> dict:
    return {k: v for k, v in entries.items() if k[0] not in accessions and v["PatientID"] not in patients}


def check_row(story: Story, row: dict, before: dict) -> None:
    """The row's columns and `expect` against the worklist (findscu) and the store; `before`: the worklist before it."""
    engine, config = story.engine, story.engine.config
    kind, trigger, control = row["message_type"], row["trigger"], row["order_control"]
    accession, patient_id, expect = row["accession"], row["patient_id"], row["expect"]
    after = engine.entries()
    mentioned = [t for t in re.findall(r"[\w.-]+", expect) if t in ACCESSIONS]
    mentioned_patients = [t for t in re.findall(r"[\w.-]+", expect) if t in PATIENT_IDS]

    # the journal: processed; no MSH-18 means the channel's fallback charset decoded it
    charset, status, ack_code = journal(engine, row)
    assert (status, ack_code) == ("processed", "AA")
    if not row["msh18"] and not row["charset"] == "ascii":
        fallback = config.channel("his_inbound").source.fallback_charset
        assert charset.replace("-", "").lower() == fallback.replace("-", "").lower()

    if kind == "ADT" and trigger in REGISTER | UPDATE:
        assert_name_stored(engine, row)
        mine = {k: v for k, v in after.items() if v["PatientID"] == patient_id}
        # the name reaches every scheduled entry of the patient (A08 after an order: expect row 18)
        assert set(mine) == {k for k, v in before.items() if v["PatientID"] == patient_id}
        for entry in mine.values():
            assert entry["PatientName"] == person_name(row, config)
        assert others(after, patients=[patient_id]) == others(before, patients=[patient_id])
    elif kind == "ADT" and trigger in MERGE:
        prior = Msg.of(row).get("MRG-1.1")
        assert prior and prior != patient_id
        survivor = patient_row(engine, patient_id)
        assert patient_row(engine, prior)["merged_into"] == survivor["id"]
        moved = {acc for acc, owner in story.owner.items() if owner in (prior, patient_id)}
        theirs = engine.entries(f"PatientID={patient_id}")
        assert {k[0] for k in theirs} == moved
        for entry in theirs.values():
            assert entry["PatientName"] == person_name(row, config)
        assert engine.entries(f"PatientID={prior}") == {}
        assert others(after, patients=[patient_id, prior]) == others(before, patients=[patient_id, prior])
        for match in re.finditer(r"([\w.-]+) merged into ([\w.-]+)", expect):
            assert (match[1], match[2]) == (prior, patient_id)
        for match in re.finditer(r"([\w.-]+) no longer in the worklist", expect):
            assert engine.entries(f"PatientID={match[1]}") == {}
        for match in re.finditer(r"([\w.-]+) now belongs to ([\w.-]+)", expect):
            found = engine.entries(f"AccessionNumber={match[1]}")
            assert [v["PatientID"] for v in found.values()] == [match[2]]
    elif kind in ("ORM", "OMG") and control in ("NW", "XO"):
        found = engine.entries(f"AccessionNumber={accession}")
        assert len(found) == 1, f"{accession}: {len(found)} entries"  # XO: same accession, one entry
        (key, entry), = found.items()
        assert_entry(engine, entry, row)
        if control == "XO":
            assert key in before and set(after) == set(before)
            assert entry["StudyInstanceUID"] == before[key]["StudyInstanceUID"], "XO keeps the Study Instance UID"
        else:
            assert key not in before and set(after) == set(before) | {key}
        assert others(after, accessions=[accession]) == others(before, accessions=[accession])
        visit = Msg.of(row).get("PV1-19.1")
        if visit:  # the order's visit number is the entry's Admission ID
            assert entry["AdmissionID"] == visit
        if patient_id in story.wards:  # an admission's ward shows on the inpatient's order (via PV1-3)
            assert entry["CurrentPatientLocation"].startswith(story.wards[patient_id])
        moved = re.search(r"from (\d\d):(\d\d) to (\d\d):(\d\d)", expect)
        if moved:
            old = next(v for k, v in before.items() if k[0] == accession)
            assert old[sps("ScheduledProcedureStepStartTime")][:4] == moved[1] + moved[2]
            assert entry[sps("ScheduledProcedureStepStartTime")][:4] == moved[3] + moved[4]
        else:
            for hh, mm in re.findall(r"\b(\d\d):(\d\d)\b", expect):
                assert entry[sps("ScheduledProcedureStepStartTime")][:4] == hh + mm
        for modality in re.findall(r"\((\w+)[,)]", expect):
            if modality.isupper() and len(modality) <= 4:
                assert entry[sps("Modality")] == modality
        priority = re.search(r"priority (\w+)", expect)
        if priority:
            assert entry["RequestedProcedurePriority"] == HL7_PRIORITY.get(priority[1], priority[1])
        for other_id in mentioned_patients:
            assert other_id == patient_id  # "scheduled for 300108"
    elif kind in ("ORM", "OMG") and control in REMOVE:
        assert engine.entries(f"AccessionNumber={accession}") == {}
        hidden = engine.entries(f"AccessionNumber={accession}", sps(f"ScheduledProcedureStepStatus={REMOVE[control]}"))
        assert len(hidden) == 1, f"{accession} should be kept as {REMOVE[control]}, shown only when asked"
        assert {k for k in before if k[0] == accession} and after == others(before, accessions=[accession])
    elif kind in ("ORM", "OMG") and control in STATUS_ONLY:
        assert after == before
    else:
        pytest.fail(f"{row['file']}: no rule for {kind}^{trigger} {control}")

    # a modality finds the patient's entries by either name group (case-insensitive pinyin, or the characters)
    if kind == "ADT" or control in ("NW", "XO"):
        active = {k for k, v in after.items() if v["PatientID"] == patient_id}
        names = [alphabetic(row, config).lower(), *([ideographic(row)] if ideographic(row) else [])]
        for name in names if active else []:
            found = engine.entries("SpecificCharacterSet=ISO_IR 192", f"PatientName={name}", f"PatientID={patient_id}")
            assert set(found) == active, f"PatientName={name}"

    # what the `expect` column names explicitly
    for name in re.findall(r"\b([A-Z]+\^[A-Z]+(?:=[^\s^]+\^[^\s)]+)?)", expect):
        assert name == person_name(row, config), f"index.tsv columns and expect disagree on {name}"
        for acc in mentioned or [accession]:
            assert {v["PatientName"] for v in engine.entries(f"AccessionNumber={acc}").values()} == {name}
    if "gone from the worklist" in expect:
        for acc in mentioned:
            assert engine.entries(f"AccessionNumber={acc}") == {}
    if "worklist is unchanged" in expect:
        assert after == before
    if "one entry" in expect:
        assert len([k for k in after if k[0] == accession]) == 1


@pytest.mark.parametrize("row", STORY, ids=[r["file"].removesuffix(".hl7") for r in STORY])
def test_story_row_facts_on_the_worklist_within_1s(story, row):
    """Acceptance 1 and 3: each file sent in order gives AA (MSA-2 = MSH-10) and its index.tsv facts via findscu."""
    story.play(row)


# --- acceptance 2: the same order in UTF-8 and in GB18030 ---------------------------------------------


def registration_for(order: dict) -> dict:
    """The ADT that registered the row's patient before it."""
    return first(lambda r: ROWS.index(r) < ROWS.index(order) and r["message_type"] == "ADT"
                 and r["trigger"] in REGISTER and r["patient_id"] == order["patient_id"])


NEW_ORDERS = [r for r in ROWS if r["message_type"] in ("ORM", "OMG") and r["order_control"] == "NW"
              and any(a["message_type"] == "ADT" and a["trigger"] in REGISTER and a["patient_id"] == r["patient_id"]
                      for a in ROWS[:ROWS.index(r)])]


def normalised(entry: dict[str, str], ids: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, value in entry.items():
        for actual, role in sorted(ids.items(), key=lambda item: -len(item[0])):
            value = value.replace(actual, role)
        out[name] = value
    return out


@pytest.mark.parametrize("order", NEW_ORDERS, ids=[r["file"].removesuffix(".hl7") for r in NEW_ORDERS])
def test_same_order_in_utf8_and_gb18030_gives_identical_entries(engine, order):
    """Acceptance 2: registration and order sent as UTF-8 and again as GB18030 (MSH-18 GB 18030-2000)."""
    adt = registration_for(order)
    entries = []
    for charset in ("UNICODE UTF-8", "GB 18030-2000"):
        keys = Keys(next(_numbers), fresh_patient())
        engine.accept(rekey(adt, keys.patient_id), charset)
        engine.accept(rekey(order, keys.patient_id, keys), charset)
        found = engine.find([f"AccessionNumber={keys.accession}"]).responses
        assert len(found) == 1
        ids = {keys.patient_id: "<patient>", **{v: f"<{k}>" for k, v in keys.order_ids().items()}}
        entries.append(normalised(flat(found[0], skip_uids=True), ids))
    utf8, gb18030 = entries
    assert utf8["PatientName"] == person_name(order, engine.config)
    assert utf8["SpecificCharacterSet"] == "ISO_IR 192"
    assert utf8 == gb18030


# --- acceptance 3 beyond the story: every entry of a patient, a merge of several orders ---------------


def first(predicate) -> dict:
    """The first index row of a kind; a message set without one skips the test that needs it."""
    row = next((r for r in ROWS if predicate(r)), None)
    if row is None:
        pytest.skip("index.tsv has no row of the kind this test rekeys")
    return row


def schedule(engine: Engine, patient_id: str, orders: list[dict], registration: dict) -> list[Keys]:
    """The orders, rekeyed for this patient, their PID demographics those of the patient's registration."""
    demographics = Msg.of(registration)
    placed = []
    for order in orders:
        keys = Keys(next(_numbers), patient_id)
        message = rekey(order, patient_id, keys)
        for location in ("PID-5", "PID-7", "PID-8"):
            message.set(location, demographics.get(location))
        engine.accept(message)
        placed.append(keys)
    return placed


def patient_beside_a_bystander(engine: Engine, registration: dict, orders: list[dict]) -> tuple[str, list[Keys]]:
    """A fresh patient with these orders, and a bystander registered the same way with the first of them: an
    update of the patient must change the patient's entries and never the bystander's."""
    patient, bystander = fresh_patient(), fresh_patient()
    engine.accept(rekey(registration, patient))
    engine.accept(rekey(registration, bystander))
    placed = schedule(engine, patient, orders, registration)
    schedule(engine, bystander, orders[:1], registration)
    return patient, placed


def test_a08_renames_every_entry_of_the_patient(engine):
    """An A08 name correction reaches every scheduled entry of that patient, and nobody else's (RAD-12)."""
    a08 = first(lambda r: r["message_type"] == "ADT" and r["trigger"] in UPDATE
                and any(a["patient_id"] == r["patient_id"] and a["hanzi"] != r["hanzi"] for a in ROWS))
    if len(NEW_ORDERS) < 3:
        pytest.skip("index.tsv has fewer than three new orders to schedule")
    adt = registration_for(a08)
    assert person_name(adt, engine.config) != person_name(a08, engine.config)
    patient, placed = patient_beside_a_bystander(engine, adt, NEW_ORDERS[:3])
    before = engine.entries()
    registered = {v["PatientName"] for v in before.values() if v["PatientID"] == patient}
    assert registered == {person_name(adt, engine.config)}
    ack = engine.accept(rekey(a08, patient))

    def renamed():
        mine = engine.entries(f"PatientID={patient}")
        assert {k[0] for k in mine} == {k.accession for k in placed}
        assert {v["PatientName"] for v in mine.values()} == {person_name(a08, engine.config)}
        assert others(engine.entries(), patients=[patient]) == others(before, patients=[patient])
    within(ack, renamed)


def test_a_transfer_moves_every_open_entry_of_the_patient_to_the_new_ward(engine):
    """A02 names the ward the patient is in now (PV1-3): Current Patient Location on each of the patient's entries
    becomes that ward, and nobody else's entry changes (RAD-12)."""
    if len(NEW_ORDERS) < 2:
        pytest.skip("index.tsv has fewer than two new orders to schedule")
    adt = registration_for(NEW_ORDERS[0])
    patient, placed = patient_beside_a_bystander(engine, adt, NEW_ORDERS[:2])
    before = engine.entries()
    ward = "心内科病房^12^3"
    assert not any(v.get("CurrentPatientLocation") == ward for v in before.values())
    transfer = rekey(adt, patient).set("MSH-9", "ADT^A02").set("PV1-2", "I").set("PV1-3", f"{ward}^HOSP")
    ack = engine.accept(transfer)

    def moved():
        mine = engine.entries(f"PatientID={patient}")
        assert {k[0] for k in mine} == {k.accession for k in placed}
        assert {v["CurrentPatientLocation"] for v in mine.values()} == {ward}
        assert others(engine.entries(), patients=[patient]) == others(before, patients=[patient])
    within(ack, moved)
    # A12 cancels the transfer: its PV1-3 is the ward the patient is back in
    back = "急诊留观"
    ack = engine.accept(transfer.set("MSH-9", "ADT^A12").set("MSH-10", f"{transfer.get('MSH-10')}C")
                        .set("PV1-3", f"{back}^^^HOSP"))

    def moved_back():
        mine = engine.entries(f"PatientID={patient}")
        assert {v["CurrentPatientLocation"] for v in mine.values()} == {back}
        assert others(engine.entries(), patients=[patient]) == others(before, patients=[patient])
    within(ack, moved_back)


def test_a40_moves_every_order_to_the_survivor(engine):
    """A40: the prior patient's orders follow the survivor; the prior id finds nothing (RAD-12, MRG-1)."""
    a40 = first(lambda r: r["message_type"] == "ADT" and r["trigger"] in MERGE)
    if len(NEW_ORDERS) < 3:
        pytest.skip("index.tsv has fewer than three new orders to schedule")
    prior_row = first(lambda r: r["message_type"] == "ADT" and r["trigger"] in REGISTER
                      and r["patient_id"] == Msg.of(a40).get("MRG-1.1"))
    survivor_row = registration_for(a40)
    prior, survivor = fresh_patient(), fresh_patient()
    engine.accept(rekey(prior_row, prior))
    engine.accept(rekey(survivor_row, survivor))
    moved = schedule(engine, prior, NEW_ORDERS[:2], prior_row)
    kept = schedule(engine, survivor, NEW_ORDERS[2:3], survivor_row)
    before = engine.entries()
    assert len(engine.entries(f"PatientID={prior}")) == 2
    ack = engine.accept(rekey(a40, survivor, prior_id=prior))

    def merged():
        assert engine.entries(f"PatientID={prior}") == {}
        theirs = engine.entries(f"PatientID={survivor}")
        assert {k[0] for k in theirs} == {k.accession for k in moved + kept}
        assert {v["PatientName"] for v in theirs.values()} == {person_name(a40, engine.config)}
        assert others(engine.entries(), patients=[prior, survivor]) == others(before, patients=[prior, survivor])
    within(ack, merged)
    # a later change addressed to the survivor finds the moved order
    cancel = first(lambda r: r["order_control"] == "CA")
    engine.accept(rekey(cancel, survivor, moved[0]))
    assert engine.entries(f"AccessionNumber={moved[0].accession}") == {}


def test_xo_changes_the_entry_ca_and_dc_remove_theirs(engine):
    """XO reschedules in place (same accession and Study Instance UID); CA and DC take only their entry away."""
    xo = first(lambda r: r["order_control"] == "XO" and any(o["accession"] == r["accession"] for o in NEW_ORDERS))
    original = next(r for r in NEW_ORDERS if r["accession"] == xo["accession"])
    ca, dc = (first(lambda r, c=c: r["order_control"] == c) for c in ("CA", "DC"))
    patient = fresh_patient()
    engine.accept(rekey(registration_for(original), patient))
    changed, cancelled, discontinued = schedule(engine, patient, [original] * 3, registration_for(original))
    before = engine.entries()
    old = engine.entries(f"AccessionNumber={changed.accession}")
    (old_entry,) = old.values()
    # XO: the file's new start, and a modality of another station, to see the station chosen again
    other = next((r["modality"] for r in NEW_ORDERS if r["modality"] != original["modality"]
                  and station_for(engine.config, r["modality"])), original["modality"])
    message = rekey(xo, patient, changed)
    message.set("OBR-24", other)
    ack = engine.accept(message)

    def rescheduled():
        found = engine.entries(f"AccessionNumber={changed.accession}")
        assert len(found) == 1
        (entry,) = found.values()
        assert entry["StudyInstanceUID"] == old_entry["StudyInstanceUID"]
        assert entry[sps("ScheduledProcedureStepStartDate")] + entry[sps("ScheduledProcedureStepStartTime")] == \
            xo["start"][:14]
        assert entry[sps("Modality")] == other
        assert entry[sps("ScheduledStationAETitle")] == station_for(engine.config, other)
        assert others(engine.entries(), accessions=[changed.accession]) == \
            others(before, accessions=[changed.accession])
    within(ack, rescheduled)
    for template, keys in ((ca, cancelled), (dc, discontinued)):
        before = engine.entries()
        ack = engine.accept(rekey(template, patient, keys))

        def removed(keys=keys, before=before):
            assert engine.entries(f"AccessionNumber={keys.accession}") == {}
            assert engine.entries() == others(before, accessions=[keys.accession])
        within(ack, removed)
    assert {k[0] for k in engine.entries(f"PatientID={patient}")} == {changed.accession}


# --- acceptance 5: character profiles per calling AE ---------------------------------------------------


CHINESE_ORDERS = [r for r in NEW_ORDERS if not latin(r)]


def test_ascii_profile_gets_pinyin_only_and_default_gets_both_groups(engine):
    """An AE configured `ascii` gets WANG^XIAODONG-style names, no Specific Character Set, no byte >= 0x80."""
    ascii_aes = sorted(ae for ae, profile in engine.config.worklist.profiles.items() if profile == "ascii")
    assert "OLD_CT" in ascii_aes  # the shipped file's example
    default_ae = "MODALITY1"
    assert default_ae not in engine.config.worklist.profiles and engine.config.worklist.default_profile == "unicode"
    if not CHINESE_ORDERS:
        pytest.skip("index.tsv has no order for a patient with a Chinese name")
    order = CHINESE_ORDERS[0]
    patient = fresh_patient()
    engine.accept(rekey(registration_for(order), patient))
    (keys,) = schedule(engine, patient, [order], registration_for(order))

    default = engine.find([f"AccessionNumber={keys.accession}"], aet=default_ae)
    (ds,) = default.responses
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == person_name(order, engine.config)
    assert "=" in str(ds.PatientName) and not str(ds.PatientName).isascii()
    for ae in ascii_aes:
        answer = engine.find([f"AccessionNumber={keys.accession}"], aet=ae)
        (ds,) = answer.responses
        assert "SpecificCharacterSet" not in ds
        assert str(ds.PatientName) == alphabetic(order, engine.config)
        assert ds.RequestedProcedureDescription and ds.RequestedProcedureDescription.isascii()
        # without Specific Character Set pydicom reads a byte >= 0x80 as a non-ASCII character
        texts = [(e.keyword, str(v)) for e in ds.iterall() if e.VR != "SQ"
                 for v in (e.value if isinstance(e.value, (list, tuple)) else [e.value]) if v is not None]
        assert texts and all(text.isascii() for _, text in texts), "an ascii modality never gets a byte >= 0x80"
    # a name query in pinyin finds the entry from the ascii AE too
    by_name = engine.find([f"PatientName={alphabetic(order, engine.config)}", f"PatientID={patient}"], aet=ascii_aes[0])
    assert [str(d.PatientName) for d in by_name.responses] == [alphabetic(order, engine.config)]


# --- acceptance 7: bad input gets a clear error and changes nothing -------------------------------------


TEMPLATES = [r for newer in (False, True)
             for r in [next((o for o in NEW_ORDERS if version_at_least(o["version"], 2, 5) == newer), None)] if r]


@pytest.fixture(scope="module")
def known(engine) -> dict[str, str]:
    """A patient registered for each template order, so that only the defect under test is wrong."""
    patients = {}
    for order in TEMPLATES:
        patients[order["file"]] = fresh_patient()
        engine.accept(rekey(registration_for(order), patients[order["file"]]))
    return patients


def _unknown_patient(order, patient):
    return rekey(order, fresh_patient(), Keys(next(_numbers), "")), "PID^1^3", {"204"}


def _cancel_unknown_order(order, patient):
    message = rekey(order, patient, Keys(next(_numbers), patient)).set("ORC-1", "CA")
    return message, "OBR^1^18", {"204"}


def _no_patient_id(order, patient):
    message = rekey(order, patient, Keys(next(_numbers), patient))
    return message.set("PID-3", ""), "PID^1^3", {"101"}


def _no_procedure_code(order, patient):
    message = rekey(order, patient, Keys(next(_numbers), patient)).set("OBR-4", "")
    if message.get("OBR-44"):
        message.set("OBR-44", "")
    return message, "OBR^1^4", {"101"}


def _adt_no_patient_id(order, patient):
    return rekey(registration_for(order), patient).set("PID-3", ""), "PID^1^3", {"101"}


BAD = {"order_for_unknown_patient": _unknown_patient, "cancel_for_unknown_order": _cancel_unknown_order,
       "order_without_pid3": _no_patient_id, "order_without_obr4": _no_procedure_code,
       "adt_without_pid3": _adt_no_patient_id}


@pytest.mark.parametrize("template", TEMPLATES, ids=[f"v{r['version']}" for r in TEMPLATES])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_ae_with_err_and_changes_nothing(engine, known, case, template):
    """Acceptance 7: AE (or AR) with ERR naming the location (ERR-2 in 2.5+, ERR-1 before); worklist unchanged."""
    message, location, codes = BAD[case](template, known[template["file"]])
    before, counts = engine.entries(), engine.counts()
    ack = engine.send(message.encode())
    assert ack.code in ("AE", "AR"), ack.text
    assert ack.control_id == message.get("MSH-10")
    assert ack.error_location() == location, ack.text
    assert ack.error_code() in codes, ack.text
    assert engine.counts() == counts
    assert engine.entries() == before
    # and the listener serves on: the next good message is accepted
    engine.accept(rekey(registration_for(template), known[template["file"]]))


@pytest.mark.parametrize("key,status,named", [
    ("MedicalAlerts=PENICILLIN", 0xA900, "MedicalAlerts"),
    ("PatientWeight=70", 0xA900, "PatientWeight"),
    ("StudyDescription=CT", 0xA900, "StudyDescription"),  # not an attribute of the worklist IOD
    (sps("ScheduledProcedureStepStartDate=2026-11-22"), 0xC000, "ScheduledProcedureStepStartDate"),
], ids=["unmatchable_key", "unmatchable_key_2", "key_outside_the_iod", "invalid_value"])
def test_query_with_an_unsupported_key_fails_and_changes_nothing(engine, key, status, named):
    """Acceptance 7: a C-FIND the SCP cannot answer gets a failure status findscu reports, with the key named."""
    before = engine.entries()
    answer = findscu(engine.dicom_port, engine.tmp, [key, *RETURN_KEYS], aec=engine.config.dicom.ae_title)
    assert answer.status == status
    assert answer.responses == []
    assert re.search(rf"DIMSE Status\s*:\s*0x{status:04x}: (Error|Failed)", answer.detail, re.I), answer.detail[-800:]
    assert re.search(rf"\[[^\]]*{named}[^\]]*\].*ErrorComment", answer.detail), answer.detail[-800:]
    assert engine.entries() == before
