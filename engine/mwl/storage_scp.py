"""Storage SCP: C-STORE of every storage SOP class into the image router (PS3.4 B, IHE RAD-8).

Datasets are taken as encoded, in the transfer syntax the modality chose (no transcoding, pixel data never
decoded); engine.actors.image_router coerces, spools and journals them (and an SR's report) before this edge
answers. Statuses (PS3.4 B.2.3): 0000 success (or B000 when coerced and the channel asks for it); A700 when the
spool or the journal cannot take the image (the modality sends it again); A900 when the dataset's SOP Class differs
from the request's; C000 for a dataset that cannot be parsed, C001 for an image no order matches on a channel that
refuses those.
"""

from __future__ import annotations

import logging
import weakref
from io import BytesIO
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    RLELossless,
)
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import AllStoragePresentationContexts

from engine.actors.image_router import ImageRouter, ReceivedImage
from engine.config import Config, DicomSource
from engine.errors import EngineError
from engine.mappings.dicom_coercion import read_header_start
from engine.mappings.dicom_worklist import clip
from engine.mwl.dicom_transport import c_store_rsp
from engine.store.spool import Spool

if TYPE_CHECKING:
    from engine.channels.runtime import Engine

log = logging.getLogger(__name__)
_association_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

SOP_CLASSES = tuple(context.abstract_syntax for context in AllStoragePresentationContexts)
# Native first: offered several, pynetdicom takes the requestor's order; these are only what is accepted.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless, MPEG2MPML, MPEG4HP41, MPEG4HP41BD,
]
SUCCESS, COERCED = 0x0000, 0xB000
# A header is looked for in at most this many first bytes of a dataset, at most this many times as they arrive.
EARLY_HEADER_BYTES = 1 << 20
EARLY_HEADER_TRIES = 4


def enabled(config: Config) -> bool:
    """Storage contexts are offered only when a channel takes images."""
    return any(c.enabled and isinstance(c.source, DicomSource) for c in config.channels)


def store_status(exc: EngineError) -> int:
    """A failure status C-STORE allows (PS3.4 B.2.3, PS3.7 C.4.2.1.4): the error's own, else C000."""
    code = exc.dimse
    if 0xA700 <= code <= 0xA7FF or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF or code in (0x0122, 0x0124):
        return code
    return 0xC000


def failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = clip(comment.encode("ascii", "replace").decode(), 64)
    return ds


def on_store(event: Event, router: ImageRouter, engine: "Engine") -> int | Dataset:
    """EVT_C_STORE: hand the encoded dataset to the router; answer once it is on disk and journaled."""
    request = event.request
    calling = event.assoc.requestor.ae_title
    if not engine.accepting(router.channel.name):  # paused or stopped from the admin UI
        return failure(0xA700, f"channel {router.channel.name} is {engine.channel_state.get(router.channel.name)}; "
                               "send again later")
    try:
        image = ReceivedImage(
            calling_ae=calling, peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
            sop_class_uid=str(request.AffectedSOPClassUID), sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax), data=request.DataSet.getvalue(),
            header_start=getattr(request.DataSet, "swf_header_start", None))
        # one look-up of the order per association: a modality sends a whole series on one
        stored = router.receive(image, cache=_association_cache.setdefault(event.assoc, {}))
    except EngineError as exc:
        status = store_status(exc)
        log.warning("image refused: %s", exc.__class__.__name__, extra={
            "calling_ae": calling, "status": f"0x{status:04X}", "error": str(exc),
            "sop_instance_uid": str(request.AffectedSOPInstanceUID)})
        return failure(status, str(exc))
    except Exception as exc:  # a defect must cost one image, not the listener
        log.error("image refused: %s", exc.__class__.__name__, extra={"calling_ae": calling})
        log.debug("storage failure", exc_info=True)
        return failure(0xC000, f"unable to process: {exc.__class__.__name__}")
    if stored.queued_on:
        engine.wake_dispatchers_threadsafe(*stored.queued_on)
    if stored.coerced and router.source.coercion_status == "warning":
        return COERCED
    return SUCCESS


def tune_storage(event: Event) -> None:
    """EVT_CONN_OPEN: what this role changes on each association it may serve (read_headers_early, answer_by_hand)."""
    read_headers_early(event)
    answer_by_hand(event)


def answer_by_hand(event: Event) -> None:
    """A C-STORE-RSP without an error comment goes out as a command set encoded here (PS3.7 9.3.1.2).

    pynetdicom builds a pydicom Dataset from the response and encodes it: ~1.2 ms of CPU per image under load, all
    of it while the modality waits for the answer before sending its next image. Only the encoding is done here;
    the P-DATA still goes through the association's DUL as pynetdicom's would. Responses with more elements
    (failures with a comment), and associations where a handler watches EVT_DIMSE_SENT, keep pynetdicom's path."""
    assoc = event.assoc
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive, context_id: int) -> None:
        if (not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None
                or primitive.ErrorComment is not None or primitive.OffendingElement is not None
                or primitive.Status is None or not primitive.AffectedSOPClassUID
                or not primitive.AffectedSOPInstanceUID or assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            send(primitive, context_id)
            return
        command = c_store_rsp(primitive.MessageIDBeingRespondedTo, str(primitive.AffectedSOPClassUID),
                              str(primitive.AffectedSOPInstanceUID), primitive.Status)
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # command set, last fragment
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send_msg


def read_headers_early(event: Event) -> None:
    """EVT_CONN_OPEN: read each C-STORE's header from its first P-DATA fragments, while the rest is arriving.

    A modality sends the next image only once this one is answered, so the ~1 ms of parsing a header after
    the whole dataset is in was ~1 ms more of its wait per image. The association's DUL thread, which
    assembles the fragments, now reads the header while the pixel data is still on its way; the handler
    takes it when the bytes it was read from are the dataset's first ones (split_header), and otherwise
    parses the whole dataset itself, which decides on whatever could not be read here."""
    dimse = event.assoc.dimse
    receive = dimse.receive_primitive

    def receive_and_read(primitive) -> None:
        receive(primitive)
        try:
            read_header(dimse.message)  # None once the message is complete
        except Exception:  # a defect here costs the early read (the handler parses the whole), not the association
            log.debug("header not read early", exc_info=True)

    def read_header(message) -> None:
        if not isinstance(message, C_STORE_RQ) or not isinstance(message.data_set, BytesIO):
            return
        arrived = message.data_set
        tried = getattr(arrived, "swf_tried", ())
        if len(tried) >= EARLY_HEADER_TRIES or getattr(arrived, "swf_header_start", None) is not None:
            return
        with arrived.getbuffer() as view:  # released before pynetdicom appends the next fragment
            size = len(view)
            if not size or size in tried:
                return
            prefix = bytes(view[:EARLY_HEADER_BYTES])
        arrived.swf_tried = (*tried, size)
        context = event.assoc._accepted_cx.get(message.context_id)
        if context is not None:
            arrived.swf_header_start = read_header_start(prefix, str(context.transfer_syntax[0]))

    dimse.receive_primitive = receive_and_read


def dicom_handlers(e: "Engine") -> list[tuple]:
    """This role's handler on the shared DICOM listener, for the one channel with a dicom source."""
    channel = next((c for c in e.config.channels if c.enabled and isinstance(c.source, DicomSource)), None)
    if channel is None:
        return []
    spool = Spool(e.data_dir / "store")
    spool.sweep_empty()
    router = ImageRouter(channel, e.store, e.writer, e.clock, spool,
                         ae_title=e.config.dicom.ae_title, names=e.config.worklist, reports=e.pipelines.process)
    return [(evt.EVT_C_STORE, on_store, [router, e]), (evt.EVT_CONN_OPEN, tune_storage)]
