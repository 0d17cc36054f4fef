"""Text the commander sends is valid UTF-8, whatever it was cut or built from.

Protobuf carries strings as UTF-8: building a message from a ``str`` that UTF-8
cannot encode raises ``UnicodeEncodeError`` on the spot (upb), and the Go side
refuses a string that is not UTF-8 when it decodes (the stream is torn down).
Such ``str`` values are easy to come by: a lone surrogate from a JSON ``"\\ud83d"``
escape in a model's output or an API's error body, a surrogate-escaped file name
(``os.listdir`` and friends map undecodable bytes to ``\\udc80``-``\\udcff``), an
exception message built from either. And bytes cut at a size limit may end in the
middle of a character.

Every message the commander builds from text it did not write itself goes through
:func:`valid_text`; every cut goes through :func:`clip` or :func:`decode_prefix`.
Slicing a ``str`` (``text[:n]``) is safe: it counts code points, never bytes.
"""

from __future__ import annotations

import codecs

#: What :func:`clip` appends to a text it shortened.
MARK = "…"


def valid_text(text: str) -> str:
    """``text`` with every code point UTF-8 cannot carry replaced by U+FFFD.

    Those are the surrogates: a lone one becomes U+FFFD, a high and low pair
    (two halves of one character, as a UTF-16 decoder would see them) becomes
    that character. Text that needs no change is returned as it is.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def clip(text: str, max_bytes: int) -> str:
    """``text`` (made valid) in at most ``max_bytes`` bytes of UTF-8, cut on a
    character boundary and ended with :data:`MARK` (counted) when it was cut."""
    text = valid_text(text)
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    room = max(max_bytes - len(MARK.encode("utf-8")), 0)
    return decode_prefix(data[:room], cut=True) + MARK


def decode_prefix(data: bytes, *, cut: bool) -> str:
    """``data`` decoded as UTF-8, invalid bytes as U+FFFD.

    With ``cut`` (``data`` is the start of something longer), a character the
    cut went through is dropped rather than shown as U+FFFD.
    """
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=not cut)
