"""Chinese patient names to DICOM Person Names with pinyin (DICOM PS3.5 6.2 PN, Annex J; GB/T 28039-2011).

A name is split into family and given parts (surname first; the longest known compound surname at the start,
else the first character; a split made by the HIS is kept), the family part is read with surname readings
(单 Shan, 曾 Zeng, 尉迟 Yuchi) and the given part as a word with pypinyin's phrase dictionary (长江 changjiang).
Characters with no reading are reported in `NameReading.unreadable` and left out of the alphabetic group, which
is always plain ASCII: the caller decides what to do with a name that lost characters (log, flag for review).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal, Mapping

from pypinyin import Style, lazy_pinyin

from engine.mappings.surnames import (
    COMPOUND_SURNAMES,
    SINGLE_SURNAMES,
    SURNAME_VARIANTS,
    TRADITIONAL_TO_SIMPLIFIED,
)

__all__ = ["NameReading", "PinyinStyle", "read_name", "alphabetic_name", "dicom_person_name"]


@dataclass(frozen=True)
class NameReading:
    """A name split into family and given parts, with their pinyin (DICOM PS3.5 6.2 PN components)."""

    family: str
    given: str
    family_pinyin: str
    given_pinyin: str
    latin: bool
    unreadable: tuple[str, ...] = ()
    # One tuple of syllables per component (family, given, middle...), so a style can separate syllables
    # (xiao-dong) and respell ü exactly where a syllable has it. Empty for Latin names and hand-built readings.
    syllables: tuple[tuple[str, ...], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class PinyinStyle:
    """Presentation of the alphabetic group: case, how ü is written, and the separator between syllables."""

    case: Literal["upper", "lower", "title"] = "upper"
    umlaut: Literal["v", "u", "yu"] = "v"
    syllable_separator: str = ""

    def __post_init__(self) -> None:
        if self.case not in ("upper", "lower", "title"):
            raise ValueError(f"case must be upper, lower or title, not {self.case!r}")
        if self.umlaut not in ("v", "u", "yu"):
            raise ValueError(f"umlaut must be v, u or yu, not {self.umlaut!r}")
        # Letters would merge into syllables and PN delimiters would corrupt the value.
        if any(not (c.isascii() and c.isprintable()) or c.isalnum() or c in _PN_DELIMITERS
               for c in self.syllable_separator):
            raise ValueError(f"syllable_separator must be ASCII punctuation or space: {self.syllable_separator!r}")


# The middle dot of minority and transliterated names, and the look-alikes people type for it. ASCII '.' only
# counts between two ideographs (a Latin 'J. Smith' keeps its full stop).
_DOTS = frozenset("\u00b7\u0387\u2022\u2027\u2219\u22c5\u2e31\u30fb\uff0e\uff65\ufe52")
_PN_DELIMITERS = "^=\\"
_MAX_COMPONENTS = 5  # family^given^middle^prefix^suffix (PS3.5 6.2)
_NO_READING = "\x00"
_PINYIN = re.compile(r"[a-z]+\Z")
_UMLAUT_SYLLABLE = re.compile(r"\A([ln])v(e?)\Z")
_UMLAUT = {"v": "v", "u": "u", "yu": "yu"}
_LATIN_EXTRA = {"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE",
                "đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th", "ı": "i"}
_COMPOUNDS = {k: tuple(v.split()) for k, v in COMPOUND_SURNAMES.items()}
_SINGLES = {k: tuple(v.split()) for k, v in SINGLE_SURNAMES.items()}


def _is_ideograph(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x323AF
            or 0xF900 <= o <= 0xFAFF or 0x2F800 <= o <= 0x2FA1F or o == 0x3007)


def _unify(ch: str) -> str:
    # Compatibility ideographs (U+F900.., U+2F800..) are the same character for reading purposes.
    o = ord(ch)
    if 0xF900 <= o <= 0xFAFF or 0x2F800 <= o <= 0x2FA1F:
        return unicodedata.normalize("NFKC", ch)
    return ch


def _simplified(text: str) -> str:
    return "".join(TRADITIONAL_TO_SIMPLIFIED.get(c, c) for c in map(_unify, text))


def _surname_key(text: str) -> str:
    return "".join(SURNAME_VARIANTS.get(c) or TRADITIONAL_TO_SIMPLIFIED.get(c, c) for c in map(_unify, text))


def _is_dot(text: str, i: int) -> bool:
    ch = text[i]
    if ch in _DOTS:
        return True
    return ch == "." and 0 < i < len(text) - 1 and _is_ideograph(text[i - 1]) and _is_ideograph(text[i + 1])


def _clean_syllable(syllable: str) -> str:
    if _PINYIN.match(syllable):
        return syllable
    # pypinyin spells a few interjections with marks (ê, ḿ); ü may come as ü (with a tone mark), u: or v.
    text = unicodedata.normalize("NFKD", syllable).lower().replace("u\u0308", "v").replace("u:", "v")
    return "".join(c for c in text if c.isascii() and c.isalnum())


def _read_word(run: str, unreadable: list[str]) -> list[str]:
    """Read a run of ideographs as one word with pypinyin's phrase dictionary, traditional read as simplified."""
    out = lazy_pinyin(_simplified(run), style=Style.NORMAL, errors=lambda s: [_NO_READING] * len(s))
    if len(out) != len(run):  # pypinyin keeps one item per ideograph; never guess an alignment if it didn't
        out = [lazy_pinyin(_simplified(c), style=Style.NORMAL, errors=lambda s: [_NO_READING])[0] for c in run]
    syllables = []
    for ch, raw in zip(run, out):
        syllable = "" if raw == _NO_READING else _clean_syllable(raw)
        if syllable:
            syllables.append(syllable)
        else:
            unreadable.append(ch)
    return syllables


def _read_text(text: str, unreadable: list[str]) -> list[str]:
    """Syllables of one component: ideograph runs read as words, ASCII letters and digits kept as they are."""
    syllables: list[str] = []
    run = ""
    kind = ""
    for i, ch in enumerate(text + "\n"):
        this = "ideo" if _is_ideograph(ch) else "ascii" if ch.isascii() and ch.isalnum() else ""
        if this != kind and run:
            syllables.extend(_read_word(run, unreadable) if kind == "ideo" else [run.lower()])
            run = ""
        kind = this
        if this:
            run += ch
        elif i < len(text) and not ch.isspace() and not _is_dot(text, i):
            unreadable.append(ch)
    return syllables


def _kept(text: str, unreadable: list[str]) -> str:
    """The ideographic component as sent, less spaces, PN delimiters and controls; one middle dot."""
    out = []
    for i, ch in enumerate(text):
        if _is_dot(text, i):
            out.append("\u00b7")
        elif ch in _PN_DELIMITERS or (unicodedata.category(ch) == "Cc" and not ch.isspace()):
            unreadable.append(ch)
        elif not ch.isspace():
            out.append(ch)
    return "".join(out)


def _pinyin_of(value: str) -> tuple[str, ...]:
    """Override values as people write them: 'le', 'Lè', 'lü', 'LU:', 'shan yu', 'Shan-Yu'."""
    bare = "".join(c for c in unicodedata.normalize("NFKD", str(value)) if not unicodedata.combining(c))
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z:\s\-'\u2019]*[A-Za-z][A-Za-z:\s\-'\u2019]*",
                                                      bare):
        raise ValueError(f"surname reading must be pinyin letters: {value!r}")
    return tuple(_clean_syllable(s) for s in re.split(r"[\s\-'\u2019]+", value) if s)


def _overrides(readings: Mapping[str, str] | None) -> dict[str, tuple[str, ...]]:
    if not readings:
        return {}
    table = {}
    for surname, value in readings.items():
        key = _surname_key(surname.strip())
        if not key or not all(map(_is_ideograph, key)):
            raise ValueError(f"surname override key must be Chinese characters: {surname!r}")
        table[key] = _pinyin_of(value)
    return table


def _is_compound(text: str, overrides: Mapping[str, tuple[str, ...]]) -> bool:
    key = _surname_key(text)
    return len(key) > 1 and (key in _COMPOUNDS or key in overrides)


def _read_family(text: str, overrides: Mapping[str, tuple[str, ...]], unreadable: list[str]) -> list[str]:
    """Surname readings first (override, then table), the character's own reading otherwise."""
    key = _surname_key(text)
    for table in (overrides, _COMPOUNDS, _SINGLES):
        if key in table:
            return list(table[key])
    # A family the HIS split but this table doesn't know (张简, 买买提): first character as a surname.
    for table in (overrides, _SINGLES):
        if key[:1] in table:
            return list(table[key[:1]]) + _read_text(text[1:], unreadable)
    return _read_text(text, unreadable)


def _split_whole(name: str, overrides: Mapping[str, tuple[str, ...]]) -> tuple[list[str], bool]:
    """Components of a name sent whole, and whether the family part is a surname (not a father's name)."""
    words = name.split()
    joined = "".join(words)
    dots = [i for i in range(len(joined)) if _is_dot(joined, i)]
    if dots:
        bounds = [-1, *dots, len(joined)]
        parts = [joined[a + 1:b] for a, b in zip(bounds, bounds[1:])]
        # Personal name first, father's name last; the father's name is the family component.
        return [parts[-1], parts[0], *(p for p in parts[1:-1] if p)], False
    if len(words) == 2 and all(map(_is_ideograph, words[0])) and (
            len(words[0]) == 1 or _is_compound(words[0], overrides)):
        return words, True  # a space after the surname is the typist's split, as good as the HIS's
    longest = max(4, *map(len, overrides)) if overrides else 4
    for size in range(min(longest, len(joined) - 1), 1, -1):  # a compound needs a given name after it
        if _is_compound(joined[:size], overrides):
            return [joined[:size], joined[size:]], True
    return [joined[:1], joined[1:]], True


def _is_latin(text: str) -> bool:
    if text.isascii():
        return True
    # 〇 (U+3007) is a number, not a letter: without the ideograph test a name of zeros was read as Latin and
    # lost its characters (found by fuzzing, tests/test_fuzz.py).
    return not any((c.isalpha() and "LATIN" not in unicodedata.name(c, "")) or _is_ideograph(c)
                   for c in unicodedata.normalize("NFKC", text))


def _fold_latin(text: str, unreadable: list[str]) -> str:
    out = []
    for ch in unicodedata.normalize("NFKC", text):
        if ch.isspace() or ch in _DOTS:  # 'Ayiguli·Maimaiti' keeps its two words apart
            out.append(" ")
        elif ch in _PN_DELIMITERS or not ch.isprintable():
            unreadable.append(ch)
        elif ch.isascii() or ch in _LATIN_EXTRA:
            out.append(_LATIN_EXTRA.get(ch, ch))
        else:
            base = "".join(c for c in unicodedata.normalize("NFKD", ch) if c.isascii() and c.isprintable())
            if base:
                out.append(base)
            else:
                unreadable.append(ch)
    return " ".join("".join(out).split())


def read_name(name: str, *, given: str | None = None,
              surname_readings: Mapping[str, str] | None = None) -> NameReading:
    """Split a patient name into family and given parts and read them as pinyin (GB/T 28039-2011).

    `name` is the whole name (王小东, 阿依古丽·买买提, 'Smith^John', 'John Smith'), or with `given` the family
    part of a name the HIS already split. `surname_readings` overrides surname readings for a site or a
    patient ({"乐": "le", "覃": "tan"}); a key of two or more characters also counts as a compound surname.
    Raises ValueError for more than five PN components or a malformed override.
    """
    if given is not None and "^" in name:
        raise ValueError("family part contains '^' although the given part was passed separately")
    overrides = _overrides(surname_readings)
    parts = [name, *given.split("^")] if given is not None else name.split("^")
    parts = [p.strip() for p in parts]
    while len(parts) > (1 if given is None else 2) and not parts[-1]:
        parts.pop()
    if not any(parts):
        return NameReading("", "", "", "", latin=False)
    if len(parts) > _MAX_COMPONENTS:
        raise ValueError(f"a person name has at most {_MAX_COMPONENTS} components, got {len(parts)}")
    unreadable: list[str] = []
    if _is_latin("".join(parts)):
        folded = [_fold_latin(p, unreadable).lower() for p in parts]
        return NameReading(parts[0], "^".join(parts[1:]), folded[0], "^".join(folded[1:]), latin=True,
                           unreadable=tuple(dict.fromkeys(unreadable)))
    surname = True
    if len(parts) == 1:
        parts, surname = _split_whole(parts[0], overrides)
    kept = [_kept(p, unreadable) for p in parts]
    syllables = [_read_family(kept[0], overrides, unreadable) if surname and kept[0]
                 else _read_text(kept[0], unreadable)]
    syllables += [_read_text(p, unreadable) for p in kept[1:]]
    return NameReading(
        family=kept[0],
        given="^".join(kept[1:]),
        family_pinyin="".join(syllables[0]),
        given_pinyin="^".join("".join(s) for s in syllables[1:]),
        latin=False,
        unreadable=tuple(dict.fromkeys(unreadable)),
        syllables=tuple(map(tuple, syllables)),
    )


def _ascii_component(text: str) -> str:
    return "".join(c for c in text if c.isascii() and c.isprintable() and c not in _PN_DELIMITERS)


def _respell(syllable: str, umlaut: str) -> str:
    # Only whole ü syllables (lv, lve, nv, nve): a Latin token kept inside a Chinese name keeps its v.
    return _UMLAUT_SYLLABLE.sub(lambda m: m[1] + _UMLAUT[umlaut] + m[2], syllable)


def _apply_case(text: str, case: str) -> str:
    return text.upper() if case == "upper" else text.lower() if case == "lower" else text.title()


def alphabetic_name(reading: NameReading, style: PinyinStyle = PinyinStyle()) -> str:
    """The alphabetic component group, 'WANG^XIAODONG' (PS3.5 6.2, Annex J); Latin names only change case."""
    components = [reading.family_pinyin, *reading.given_pinyin.split("^")]
    out = []
    for i, component in enumerate(components):
        if reading.latin:
            text = " ".join(_ascii_component(component).split())
        else:
            syllables = reading.syllables[i] if i < len(reading.syllables) else ()
            if "".join(syllables) != component:
                # Hand-built or replaced reading: its text wins; in joined pinyin every v after l/n is ü.
                component = _clean_syllable(component)
                syllables = (re.sub(r"(?<=[ln])v", _UMLAUT[style.umlaut], component),) if component else ()
            else:
                syllables = tuple(_respell(s, style.umlaut) for s in syllables)
            text = _ascii_component(style.syllable_separator.join(syllables))
        out.append(_apply_case(text, style.case))
    while out and not out[-1]:
        out.pop()
    return "^".join(out)


def dicom_person_name(reading: NameReading, style: PinyinStyle = PinyinStyle(), *,
                      ideographic: bool = True) -> str:
    """PN value 'WANG^XIAODONG=王^小东' (PS3.5 Annex J, I.2); alphabetic group only for Latin names."""
    alphabetic = alphabetic_name(reading, style)
    if not ideographic or reading.latin:
        return alphabetic
    components = ["".join(c for c in part if c not in _PN_DELIMITERS and unicodedata.category(c) != "Cc")
                  for part in [reading.family, *reading.given.split("^")]]
    while components and not components[-1]:
        components.pop()
    return f"{alphabetic}={'^'.join(components)}" if components else alphabetic
