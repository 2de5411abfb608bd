"""C-FIND response identifiers: the request's keys filled from a worklist item (PS3.4 C.4.1.1.3.2, K.6.1.2.2).

Every key of the request is in the response, nested sequence keys included, zero-length when the item has no
value; no other key is added except SpecificCharacterSet. A sequence asked with no item is universal (C.2.2.2.6):
whole items come back.

ResponsePlan compiles the request once per query and encodes each match straight to bytes in the negotiated
transfer syntax (PS3.5 7.1, 7.5: defined lengths, even padding), byte for byte what pydicom writes for
`respond()`: building and encoding a pydicom Dataset per match cost about 1 ms, most of a large answer's time.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID

from engine.mappings.dicom_worklist import SPECIFIC_CHARACTER_SET, Item

CODECS = {None: "ascii", "ISO_IR 192": "utf-8", "GB18030": "gb18030"}
# PS3.5 7.1.2: these VRs have a 2-byte reserved field and a 4-byte length in explicit VR.
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _vr(tag: int, fallback: str = "UN") -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return fallback
    return vr if len(vr) == 2 else fallback  # ambiguous VRs ("US or SS") are never filled here


@dataclass(frozen=True)
class Node:
    """One key of the response: its VR, and for a sequence the keys of its items (None: whole items)."""

    tag: int
    vr: str
    children: tuple["Node", ...] | None = None


def _compile(request: Dataset) -> tuple[Node, ...]:
    nodes = []
    for element in request:
        tag = int(element.tag)
        if tag == SPECIFIC_CHARACTER_SET or tag & 0xFFFF == 0:
            continue
        # The dictionary's VR where it has one, so a value is written as the standard types it.
        vr = _vr(tag, element.VR if len(element.VR) == 2 else "UN")
        if vr == "SQ" and element.VR == "SQ":
            children = _compile(element.value[0]) if len(element.value) else None
            nodes.append(Node(tag, "SQ", children))
        else:
            nodes.append(Node(tag, "UN" if vr == "SQ" else vr))
    return tuple(nodes)


class ResponsePlan:
    """The response shape of one request, and its encoder for one transfer syntax."""

    def __init__(self, request: Dataset, charset: str | None, transfer_syntax: str = "1.2.840.10008.1.2") -> None:
        self.nodes = _compile(request)
        self.charset = charset
        self.codec = CODECS[charset]
        if charset is not None or SPECIFIC_CHARACTER_SET in request:
            self.nodes = tuple(sorted((*self.nodes, Node(SPECIFIC_CHARACTER_SET, "CS")), key=lambda n: n.tag))
        ts = UID(transfer_syntax)
        self.explicit = not ts.is_implicit_VR
        self.endian = "<" if ts.is_little_endian else ">"
        self.deflated = ts.is_deflated

    def encode(self, item: Item) -> bytes:
        """The response identifier for one matching item."""
        data = b"".join(self._nodes(self.nodes, item))
        if self.deflated:  # PS3.5 A.5: raw deflate, no zlib header
            deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
            data = deflater.compress(data) + deflater.flush()
        return data

    def _nodes(self, nodes: tuple[Node, ...], values: Item) -> list[bytes]:
        out = []
        for node in nodes:
            value = self.charset or "" if node.tag == SPECIFIC_CHARACTER_SET else values.get(node.tag)
            if node.vr == "SQ":
                items = value if isinstance(value, list) else []
                body = b"".join(self._item(node.children, nested) for nested in items)
                out.append(self._header(node.tag, "SQ", len(body)) + body)
            else:
                raw = self._text(value, node.vr) if isinstance(value, str) else b""
                out.append(self._header(node.tag, node.vr, len(raw)) + raw)
        return out

    def _item(self, children: tuple[Node, ...] | None, values: Item) -> bytes:
        if children is None:
            children = tuple(Node(tag, "SQ" if isinstance(values[tag], list) else _vr(tag)) for tag in sorted(values))
        body = b"".join(self._nodes(children, values))
        return struct.pack(self.endian + "HHI", ITEM >> 16, ITEM & 0xFFFF, len(body)) + body

    def _text(self, value: str, vr: str) -> bytes:
        raw = value.encode(self.codec if vr in _SPECIFIC else "ascii", errors="replace")
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        return raw

    def _header(self, tag: int, vr: str, length: int) -> bytes:
        group, element = tag >> 16, tag & 0xFFFF
        if not self.explicit:
            return struct.pack(self.endian + "HHI", group, element, length)
        code = vr.encode()
        if code in LONG_VRS:
            return struct.pack(self.endian + "HH2sHI", group, element, code, 0, length)
        return struct.pack(self.endian + "HH2sH", group, element, code, length)


# PS3.5 6.1.2.3: the VRs whose values the Specific Character Set applies to.
_SPECIFIC = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


def respond(request: Dataset, item: Dataset, charset: str | None) -> Dataset:
    """The same response as a pydicom Dataset: the reference ResponsePlan is tested against."""
    out = _project(request, item)
    if charset:
        out.SpecificCharacterSet = charset
    elif SPECIFIC_CHARACTER_SET in request:
        out.add_new(SPECIFIC_CHARACTER_SET, "CS", None)  # asked for; empty is the default repertoire
    return out


def _project(request: Dataset, item: Dataset) -> Dataset:
    out = Dataset()
    for element in request:
        tag = element.tag
        if tag == SPECIFIC_CHARACTER_SET or tag.element == 0:
            continue
        known = item.get(tag)  # by tag: the DataElement
        if element.VR == "SQ":
            if known is None or known.VR != "SQ":
                out.add_new(tag, "SQ", [])
            elif len(element.value) == 0:
                out.add_new(tag, "SQ", list(known.value))
            else:
                out.add_new(tag, "SQ", [_project(element.value[0], nested) for nested in known.value])
        elif known is not None:
            out[tag] = known
        else:
            out.add_new(tag, element.VR, None)
    return out
