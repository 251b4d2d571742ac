"""What the agent may write about its inputs: camera URIs without credentials, file names safe for one log line."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
# Query parameters that IP cameras use for credentials (http://cam/video.cgi?user=admin&pwd=...).
_SECRET_PARAM = re.compile(r"user|login|pass|pwd|secret|token|key|auth|sig|credential", re.IGNORECASE)
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def redact_uri(uri: str | int) -> str:
    """The URI with its user name, password and credential-like query values replaced by ``***``.

    A device index or a plain path comes back unchanged (as text).
    """
    text = str(uri)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{REDACTED}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not parseable (a bad port, a bracket): say nothing of it rather than leak it
        scheme = text.split("://", 1)[0]
        return f"{scheme}://{REDACTED}"


def redact_text(text: str, uri: str | int) -> str:
    """``text`` (an error message from a backend) with ``uri``, and its password, replaced by the redacted URI."""
    raw = str(uri)
    if "://" not in raw:
        return text
    text = text.replace(raw, redact_uri(raw))
    try:
        password = urlsplit(raw).password
    except ValueError:
        password = None
    return text.replace(password, REDACTED) if password else text


def printable(text: str) -> str:
    """Text safe for one log line: control characters, newlines and undecodable bytes escaped (``\\n``, ``\\x1b``)."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)
