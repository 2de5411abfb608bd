"""Modality Worklist SCP over real sockets with DCMTK findscu/echoscu as the modality (issue 3, PS3.4 K).

One server for the module: the engine's DICOM listener in-process on a fresh SQLite store holding the
mwl_fixture rows. Every battery query asserts exactly the (accession, step id) pairs computed from the
fixture rows in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityWorklistInformationFind

from engine.app import build_engine
from engine.config import Config
from engine.mwl.dicom_guard import SupportedContexts
from engine.mwl.dicom_server import start_dicom_server
from engine.store.db import Store
from peers import dcmtk_tool, findscu, free_port
from mwl_fixture import HIDDEN, TODAY, Row, build_rows, expected, load


FINDSCU, ECHOSCU = dcmtk_tool("findscu"), dcmtk_tool("echoscu")
pytestmark = [pytest.mark.dcmtk,
              pytest.mark.skipif(not (FINDSCU and ECHOSCU),
                                 reason="DCMTK findscu/echoscu not on PATH (pynetdicom's findscu does not count)")]

ROWS = build_rows()
AET = "SWF_ENGINE"
ENV = {**os.environ, "TCP_NODELAY": "1"}
RETURN_KEYS = ["AccessionNumber", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID"]


@dataclass
class Server:
    port: int
    store: Store
    rows: list[Row]
    tmp: Path


@dataclass
class Answer:
    status: int
    responses: list[Dataset] = field(default_factory=list)
    detail: str = ""

    @property
    def keys(self) -> list[tuple[str, str]]:
        return sorted((r.AccessionNumber, r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)
                      for r in self.responses)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("mwl")
    store = Store(f"sqlite:///{tmp / 'swf.db'}")
    store.migrate()
    load(store, ROWS)
    port = free_port()
    config = Config.model_validate({
        "channels": [{"name": "his_out", "source": {"type": "internal"},
                      "destinations": [{"name": "his", "type": "mllp", "host": "127.0.0.1", "port": 9}]}],
        "dicom": {"ae_title": AET, "port": port},
        "worklist": {"profiles": {"ASCIIMOD": "ascii", "GBMOD": "gb18030"}},
    })
    engine = build_engine(config, store, tmp)
    stop = asyncio.run(start_dicom_server(engine))
    yield Server(port, store, ROWS, tmp)
    asyncio.run(stop())
    store.dispose()


_counter = iter(range(1_000_000))


def find(server: Server, keys: list[str | bytes], *, aet: str = "MODALITY1", files: list[Path] = (),
         extra: list[str] = ()) -> Answer:
    """Run DCMTK findscu -W (peers.findscu): the final status, the responses, the log."""
    result = findscu(server.port, server.tmp / f"q{next(_counter)}", keys, aet=aet, aec=AET, files=files, extra=extra)
    return Answer(result.status, result.responses, result.detail)


def sps(key: str) -> str:
    return f"ScheduledProcedureStepSequence[0].{key}"


def visible(predicate: Callable[[Row], bool]) -> Callable[[Row], bool]:
    return lambda r: predicate(r) and r.status not in HIDDEN


def _first(predicate: Callable[[Row], bool]) -> Row:
    return next(r for r in ROWS if predicate(r) and r.status not in HIDDEN)


ONE = _first(lambda r: r.accession.startswith("ACC") and r.start_date != TODAY)
UIDS = [r.study_uid for r in ROWS if r.status not in HIDDEN][5:8]
WANG = _first(lambda r: r.family == "王" and r.given == "小东")

# (name, keys, predicate, show hidden statuses)
BATTERY = [
    ("single_value", [f"AccessionNumber={ONE.accession}"], lambda r: r.accession == ONE.accession, False),
    ("single_value_patient_id_issuer", ["PatientID=P0005", "IssuerOfPatientID=HOSP"],
     lambda r: r.patient_id == "P0005" and r.issuer == "HOSP", False),
    ("universal_empty", ["PatientName=", sps("Modality="), sps("ScheduledStationAETitle=")], lambda r: True, False),
    ("universal_star", ["PatientName=*", sps("Modality=*")], lambda r: True, False),
    ("wildcard_star", ["PatientID=P001*"], lambda r: r.patient_id.startswith("P001"), False),
    ("wildcard_question", ["AccessionNumber=ACC0012?"], lambda r: re.fullmatch(r"ACC0012.", r.accession), False),
    ("wildcard_underscore_is_literal", ["AccessionNumber=Q_*"], lambda r: r.accession == "Q_1", False),
    ("wildcard_percent_is_literal", ["AccessionNumber=Q%*"], lambda r: r.accession == "Q%2", False),
    ("date_single", [sps("ScheduledProcedureStepStartDate=20261123")], lambda r: r.start_date == "20261123", False),
    ("date_range_closed", [sps("ScheduledProcedureStepStartDate=20261101-20261130")],
     lambda r: "20261101" <= r.start_date <= "20261130", False),
    ("date_range_from", [sps("ScheduledProcedureStepStartDate=20261201-")], lambda r: r.start_date >= "20261201",
     False),
    ("date_range_until", [sps("ScheduledProcedureStepStartDate=-20261015")], lambda r: r.start_date <= "20261015",
     False),
    ("time_range", [sps("ScheduledProcedureStepStartTime=0800-1000")],
     lambda r: "0800" <= r.start_time[:4] <= "1000", False),
    ("time_range_over_midnight", [sps("ScheduledProcedureStepStartTime=2200-0200")],
     lambda r: r.start_time >= "220000" or r.start_time[:4] <= "0200", False),
    ("datetime_range_combined", [sps("ScheduledProcedureStepStartDate=20261121-20261122"),
                                 sps("ScheduledProcedureStepStartTime=2000-0800")],
     lambda r: "20261121200000" <= r.start_date + r.start_time and (r.start_date + r.start_time)[:12] <= "202611220800",
     False),
    ("datetime_range_open", [sps("ScheduledProcedureStepStartDate=20261122-"),
                             sps("ScheduledProcedureStepStartTime=1200-")],
     lambda r: r.start_date + r.start_time >= "20261122120000", False),
    ("uid_list", ["StudyInstanceUID=" + "\\".join([*UIDS, "1.2.999.404"])], lambda r: r.study_uid in UIDS, False),
    ("station_ae_today", [sps("ScheduledStationAETitle=CT01"), sps(f"ScheduledProcedureStepStartDate={TODAY}")],
     lambda r: r.station == "CT01" and r.start_date == TODAY, False),
    ("modality", [sps("Modality=MR")], lambda r: r.modality == "MR", False),
    ("station_name_wildcard", [sps("ScheduledStationName=US0*")], lambda r: r.station.startswith("US0"), False),
    ("step_id", [sps(f"ScheduledProcedureStepID={ONE.step_id}")], lambda r: r.step_id == ONE.step_id, False),
    ("patient_name_pinyin_wildcard", ["PatientName=WANG*"], lambda r: r.alphabetic.startswith("WANG"), False),
    ("patient_name_case_insensitive", ["PatientName=wang^xiaodong"], lambda r: r.alphabetic == "WANG^XIAODONG",
     False),
    ("patient_name_latin", ["PatientName=smith^j*"], lambda r: r.alphabetic.startswith("SMITH^J"), False),
    ("patient_name_hanzi", ["SpecificCharacterSet=ISO_IR 192", "PatientName=王^小东".encode()],
     lambda r: r.ideographic == "王^小东", False),
    ("patient_name_hanzi_wildcard", ["SpecificCharacterSet=ISO_IR 192", "PatientName=王*".encode()],
     lambda r: r.family == "王", False),
    ("patient_name_both_groups", ["SpecificCharacterSet=ISO_IR 192", "PatientName=WANG^XIAODONG=王^小东".encode()],
     lambda r: r.ideographic == "王^小东", False),
    ("status_hidden_unless_asked", [sps("ScheduledProcedureStepStatus=COMPLETED")],
     lambda r: r.status == "COMPLETED", True),
    ("status_visible", [sps("ScheduledProcedureStepStatus=ARRIVED")], lambda r: r.status == "ARRIVED", False),
    ("priority", ["RequestedProcedurePriority=STAT"], lambda r: r.priority == "S", False),
    ("birth_date_range", ["PatientBirthDate=19500101-19591231"],
     lambda r: "19500101" <= r.birth_date <= "19591231", False),
    ("sex", ["PatientSex=F"], lambda r: r.sex == "F", False),
    ("referring_physician", ["ReferringPhysicianName=li^ming"], lambda r: r.referring == "LI^MING", False),
    ("requested_procedure_code", ["RequestedProcedureCodeSequence[0].CodeValue=CT0101"],
     lambda r: r.procedure_code == "CT0101", False),
]


@pytest.mark.parametrize("name,keys,predicate,show_hidden", BATTERY, ids=[b[0] for b in BATTERY])
def test_matching_battery(server, name, keys, predicate, show_hidden):
    answer = find(server, [*keys, *RETURN_KEYS])
    want = expected(server.rows, predicate, show_hidden=show_hidden)
    assert answer.status == 0x0000, answer.detail[-1500:]
    assert want, f"{name}: the fixture must give this query something to find"
    assert answer.keys == want
    if name not in ("universal_empty", "universal_star"):
        assert len(want) < len(expected(server.rows, lambda r: True))


def test_hidden_statuses_never_show_by_default(server):
    answer = find(server, ["PatientName=", *RETURN_KEYS, sps("ScheduledProcedureStepStatus")])
    statuses = {r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus for r in answer.responses}
    assert statuses and not statuses & HIDDEN
    assert len(answer.responses) == len(expected(server.rows, lambda r: True))


def test_every_requested_key_comes_back_and_nothing_else(server):
    keys = ["PatientName", "PatientID", "PatientBirthDate", "AdmissionID", "PatientWeight", "MedicalAlerts",
            "RequestedProcedureDescription", "RequestedProcedureCodeSequence", "StudyInstanceUID",
            f"AccessionNumber={WANG.accession}", "ReferencedStudySequence",
            sps("Modality"), sps("ScheduledStationAETitle"), sps("ScheduledProcedureStepStartDate"),
            sps("ScheduledProcedureStepID"), sps("PreMedication"), sps("ScheduledProtocolCodeSequence[0].CodeValue"),
            sps("ScheduledProtocolCodeSequence[0].CodeMeaning"), "(0009,0010)"]
    answer = find(server, keys)
    assert answer.status == 0 and answer.responses
    for ds in answer.responses:
        top = {e.keyword or str(e.tag) for e in ds}
        assert top == {"SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "AdmissionID",
                       "PatientWeight", "MedicalAlerts", "RequestedProcedureDescription",
                       "RequestedProcedureCodeSequence", "StudyInstanceUID", "AccessionNumber",
                       "ReferencedStudySequence", "ScheduledProcedureStepSequence", "(0009,0010)"}
        assert ds.AdmissionID == f"V{WANG.accession[-4:]}"  # the visit number (PV1-19) the order came with
        assert ds.PatientWeight is None and ds.MedicalAlerts == "" and ds.ReferencedStudySequence == []
        # a sequence asked with no item is universal: whole code items come back
        assert ds.RequestedProcedureCodeSequence[0].CodeValue == WANG.procedure_code
        assert ds.RequestedProcedureCodeSequence[0].CodingSchemeDesignator == "99HIS"
        item = ds.ScheduledProcedureStepSequence[0]
        assert {e.keyword for e in item} == {"Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                                             "ScheduledProcedureStepID", "PreMedication",
                                             "ScheduledProtocolCodeSequence"}
        assert item.Modality == WANG.modality and item.PreMedication == ""
        protocol = item.ScheduledProtocolCodeSequence[0]
        assert {e.keyword for e in protocol} == {"CodeValue", "CodeMeaning"}
        assert protocol.CodeMeaning == WANG.procedure_meaning


def test_admission_id_is_a_matching_key(server):
    answer = find(server, [f"AdmissionID=V{WANG.accession[-4:]}", "AccessionNumber"])
    assert answer.status == 0 and {ds.AccessionNumber for ds in answer.responses} == {WANG.accession}


def _wang(server, aet):
    answer = find(server, [f"AccessionNumber={WANG.accession}", "PatientName", "RequestedProcedureDescription",
                           "ReasonForTheRequestedProcedure", "ReferringPhysicianName", sps("ScheduledStationName"),
                           sps("ScheduledProcedureStepLocation"), sps("ScheduledProcedureStepDescription")], aet=aet)
    assert answer.status == 0 and len(answer.responses) >= 1
    return answer.responses[0]


def test_default_profile_is_unicode_with_ideographic_group(server):
    ds = _wang(server, "MODALITY1")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "WANG^XIAODONG=王^小东"
    assert ds.RequestedProcedureDescription == WANG.procedure_meaning


def test_ascii_profile_sends_pinyin_only_and_no_charset(server):
    ds = _wang(server, "ASCIIMOD")
    assert "SpecificCharacterSet" not in ds
    assert str(ds.PatientName) == "WANG^XIAODONG"
    for element in ds.iterall():
        if isinstance(element.value, str) or element.VR == "PN":
            assert str(element.value).isascii(), element
    assert ds.ReasonForTheRequestedProcedure == "Ke Sou Liang Zhou"  # 咳嗽两周
    assert ds.RequestedProcedureDescription and ds.RequestedProcedureDescription.isascii()
    # Latin patients keep their one group in every profile
    latin = find(server, ["PatientName=SMITH^JOHN", *RETURN_KEYS], aet="ASCIIMOD").responses[0]
    assert str(latin.PatientName) == "SMITH^JOHN"


def test_gb18030_profile_round_trips(server):
    ds = _wang(server, "GBMOD")
    assert ds.SpecificCharacterSet == "GB18030"
    assert str(ds.PatientName) == "WANG^XIAODONG=王^小东"
    assert ds.RequestedProcedureDescription == WANG.procedure_meaning
    assert str(ds.ReferringPhysicianName).endswith("=" + WANG.referring) or not WANG.referring


def test_latin_name_has_only_the_alphabetic_group(server):
    answer = find(server, ["PatientName=SMITH^JOHN", *RETURN_KEYS])
    assert answer.responses and {str(r.PatientName) for r in answer.responses} == {"SMITH^JOHN"}


def test_query_in_gb18030_with_a_backslash_byte_matches(server):
    # 昞 is 0x95 0x5C in GB18030: the second byte is a backslash, which must not split the value.
    query = Dataset()
    query.SpecificCharacterSet = "GB18030"
    query.PatientName = "陈^昞"
    query.AccessionNumber = ""
    query.ScheduledProcedureStepSequence = [Dataset()]
    query.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID = ""
    path = server.tmp / "gb_query.dcm"
    query.save_as(path, implicit_vr=False, little_endian=True)
    assert b"\x95\x5c" in path.read_bytes()
    answer = find(server, [], files=[path], aet="GBMOD")
    want = expected(server.rows, lambda r: r.ideographic == "陈^昞")
    assert want and answer.keys == want
    assert {str(r.PatientName) for r in answer.responses} == {"CHEN^BING=陈^昞"}
    # and GB18030 bytes straight from the command line
    answer = find(server, ["SpecificCharacterSet=GB18030", "PatientName=王^小东".encode("gb18030"), *RETURN_KEYS])
    assert answer.keys == expected(server.rows, lambda r: r.ideographic == "王^小东")


def _echo(server) -> int:
    return subprocess.run([ECHOSCU, "-aec", AET, "127.0.0.1", str(server.port)], env=ENV, capture_output=True,
                          timeout=30).returncode


def test_each_association_gets_its_own_contexts_and_shares_only_their_uids():
    """pynetdicom deep-copies the listener's contexts per association; the copy may be changed by negotiation
    without touching the listener's, and the immutable UIDs are not copied (that was most of an association's cost)."""
    listener = SupportedContexts([build_context(ModalityWorklistInformationFind, ["1.2.840.10008.1.2.1",
                                                                                  "1.2.840.10008.1.2"])])
    first, second = copy.deepcopy(listener), copy.deepcopy(listener)
    assert first[0] is not listener[0] and first[0] is not second[0]
    assert first[0].abstract_syntax is listener[0].abstract_syntax
    first[0].context_id, first[0].result = 1, 0x00
    first[0].transfer_syntax.remove("1.2.840.10008.1.2")
    assert listener[0].context_id is None and listener[0].result is None
    assert listener[0].transfer_syntax == second[0].transfer_syntax == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@contextlib.contextmanager
def probe_association(server, sop_class) -> Iterator[tuple[Association, Association]]:
    """An association of ours with the listener, and the listener's side of it (its acceptor thread)."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(sop_class)
    before = {t for t in threading.enumerate() if isinstance(t, Association)}
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AET)
    assert assoc.is_established
    try:
        [acceptor] = [t for t in threading.enumerate()
                      if isinstance(t, Association) and t.is_acceptor and t not in before]
        yield assoc, acceptor
    finally:
        assoc.release()


def test_the_listener_copies_its_contexts_that_way(server):
    """The running listener (start_guarded_server) hands each association contexts whose UIDs are its own."""
    with probe_association(server, ModalityWorklistInformationFind) as (_, acceptor):
        listener = {str(c.abstract_syntax): c for c in acceptor._server.contexts}
        assert isinstance(acceptor._server.contexts, SupportedContexts)
        worklist = listener[str(ModalityWorklistInformationFind)]
        [mine] = [c for c in acceptor.acceptor.supported_contexts if c.abstract_syntax == worklist.abstract_syntax]
        assert mine is not worklist and mine.abstract_syntax is worklist.abstract_syntax


def test_c_echo(server):
    assert _echo(server) == 0


@pytest.mark.parametrize("keys,status,comment", [
    (["MedicalAlerts=PENICILLIN"], 0xA900, "MedicalAlerts"),
    ([sps("PreMedication=none")], 0xA900, "PreMedication"),
    (["ReferencedStudySequence[0].ReferencedSOPInstanceUID=1.2.3"], 0xA900, "ReferencedSOPInstanceUID"),
    ([sps("ScheduledProcedureStepStartDate=2026-11-22")], 0xC000, "ScheduledProcedureStepStartDate"),
    ([sps("ScheduledProcedureStepStartTime=25h")], 0xC000, "ScheduledProcedureStepStartTime"),
    (["ScheduledProcedureStepSequence[1].Modality=CT"], 0xC000, "ScheduledProcedureStepSequence"),
], ids=["unknown_top_level", "unmatchable_in_sequence", "unknown_sequence", "bad_date", "bad_time", "two_items"])
def test_bad_queries_fail_and_the_server_serves_on(server, keys, status, comment):
    answer = find(server, [*keys, *RETURN_KEYS])
    assert answer.status == status
    assert not answer.responses
    assert re.search(r"ErrorComment", answer.detail) and comment in answer.detail
    assert _echo(server) == 0
    assert find(server, [f"AccessionNumber={ONE.accession}", *RETURN_KEYS]).keys == [ONE.key]


def test_undecodable_identifier_fails_with_c000(server, monkeypatch):
    # A peer that sends (0028,0010) US with 3 bytes: pynetdicom decodes lazily, the handler must catch it.
    raw = b"\x10\x00\x10\x00\x00\x00\x00\x00" + b"\x28\x00\x10\x00\x03\x00\x00\x00abc"
    monkeypatch.setattr("pynetdicom.association.encode", lambda *args, **kwargs: raw)
    ae = AE(ae_title="BROKEN")
    ae.add_requested_context(ModalityWorklistInformationFind, "1.2.840.10008.1.2")
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AET)
    assert assoc.is_established
    try:
        statuses = [status for status, _ in assoc.send_c_find(Dataset(), ModalityWorklistInformationFind)]
    finally:
        assoc.release()
    assert statuses[-1].Status == 0xC000
    assert "decoded" in statuses[-1].ErrorComment
    assert _echo(server) == 0


def test_c_cancel_stops_the_answer(server):
    everything = expected(server.rows, lambda r: True)
    answer = find(server, ["PatientName=", *RETURN_KEYS], extra=["--cancel", "2"])
    assert answer.status == 0xFE00
    assert 2 <= len(answer.responses) < len(everything)


def test_tcp_nodelay_on_accepted_sockets(server):
    """The acceptor's socket has TCP_NODELAY while the association is up, and many responses stay fast."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AET)
    assert assoc.is_established
    try:
        acceptors = [t for t in threading.enumerate() if isinstance(t, Association) and t.is_acceptor]
        assert acceptors
        for acceptor in acceptors:
            assert acceptor.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        assoc.release()
    # ~100 responses: with Nagle on, each would wait on the modality's delayed ACK (~40 ms).
    started = time.perf_counter()
    answer = find(server, [sps("ScheduledProcedureStepStartDate=20261121-20261123"), *RETURN_KEYS])
    elapsed = time.perf_counter() - started
    assert len(answer.responses) >= 80
    assert elapsed < 2.0, f"{len(answer.responses)} responses took {elapsed:.2f} s"


def test_idle_association_waits_for_news_instead_of_polling(server):
    """An open, idle association costs the listener a look every 50 ms, not thousands (pynetdicom's DUL checks
    its socket every 1 ms, or 0.2 ms as the engine had it for images, and its reactor looks for a DIMSE message
    every 1 ms); requests after the idle second are answered, and the association's end closes the DUL's wake-up
    sockets."""
    with probe_association(server, "1.2.840.10008.1.1") as (assoc, acceptor):
        wait = acceptor.dul.swf_wait
        looks = []
        check = wait._check
        wait._check = lambda: looks.append(1) or check()
        reactor_looks = []
        get_msg = acceptor.dimse.get_msg
        acceptor.dimse.get_msg = lambda block=False: reactor_looks.append(1) or get_msg(block)
        time.sleep(1.0)
        assert 5 <= len(looks) <= 100, f"{len(looks)} socket checks in an idle second"
        assert 5 <= len(reactor_looks) <= 100, f"{len(reactor_looks)} reactor turns in an idle second"
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0
    acceptor.join(5)
    assert not acceptor.is_alive()
    assert wait._bell.fileno() == -1 and wait._ringer.fileno() == -1


@pytest.mark.slow
def test_serve_starts_the_dicom_listener(tmp_path):
    """`swf-engine serve` with the shipped channels.yaml answers C-ECHO and an empty worklist (issue 3 wiring)."""
    from peers import REPO, running_engine

    ports = {name: free_port() for name in ("SWF_DICOM_PORT", "SWF_HL7_PORT", "SWF_HIS_PORT", "SWF_HTTP_PORT")}
    env = {name: str(port) for name, port in ports.items()}
    with running_engine(REPO / "channels.yaml", tmp_path / "var", [ports["SWF_DICOM_PORT"]], env=env):
        server = Server(ports["SWF_DICOM_PORT"], None, [], tmp_path)
        assert _echo(server) == 0
        answer = find(server, ["PatientName=", *RETURN_KEYS], aet="OLD_CT")
        assert answer.status == 0 and answer.responses == []
