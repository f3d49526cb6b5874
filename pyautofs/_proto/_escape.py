"""Escaping untrusted text for logs and messages.

Keys come from any local user (a lookup of any name under a mount point), and program-map
output, LDAP values and paths are no more trustworthy. Written raw, a key with a newline
forges a log line and one with terminal escapes rewrites an operator's screen. Everything
untrusted goes through :func:`printable` before it reaches a log or an error message.
"""

from __future__ import annotations

__all__ = ["printable"]

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Printable ASCII except the backslash maps to itself; everything else is escaped.
_TABLE = {c: (_NAMED.get(chr(c)) or f"\\x{c:02x}") for c in range(256) if not 0x20 <= c < 0x7F}
_TABLE[ord("\\")] = "\\\\"


def printable(text: str | bytes, limit: int = 256) -> str:
    """``text`` with control, non-ASCII and backslash characters escaped, cut at ``limit``.

    Bytes are decoded with ``surrogateescape`` first, so undecodable bytes show as
    ``\\xNN``; characters above U+00FF show as ``\\uNNNN``. The result is a single line of
    printable ASCII. Text longer than ``limit`` characters is cut and ends with ``...``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if text.isascii() and text.isprintable() and "\\" not in text:
        out = text
    else:
        out = "".join(_escape_char(ch) for ch in text)
    return out + "..." if cut else out


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 256:
        return _TABLE.get(code, ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
