"""Secrets kept out of everything the job writes: redact() and the log formatter that applies it
to every log line."""

from __future__ import annotations

import logging
import os
import re

REDACTED = "***"
# query parameters that carry credentials: presigned URLs, tokens, API keys
_SECRET_PARAMS = (
    r"x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|"
    r"id_token|refresh_token|auth|authorization|password|passwd|pwd|secret|client_secret|"
    r"api_key|apikey|key|session_token|sas|code"
)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]+@")
_QUERY_SECRET = re.compile(rf"(?i)([?&;](?:{_SECRET_PARAMS})=)[^&;#\s'\"]+")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# environment variables whose values are secrets wherever they show up
_SECRET_ENV = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL)")
_MIN_SECRET_LEN = 8  # shorter values would redact ordinary words


def redact(text: str) -> str:
    """text with every secret it may hold replaced by ***: the user:password of URLs, credential
    query parameters (token=, X-Amz-Signature=, sig=...), AWS access key ids, and the values of
    secret environment variables (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN...).

    Everything the job writes that could hold a setting's value goes through it: log lines,
    config.json and checkpoints (public_dict), metric labels."""
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _QUERY_SECRET.sub(rf"\1{REDACTED}", text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    for name, value in os.environ.items():
        if len(value) >= _MIN_SECRET_LEN and _SECRET_ENV.search(name) and value in text:
            text = text.replace(value, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter whose lines, tracebacks included, pass through redact()."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def redact_logs() -> None:
    """Make every handler of the root logger redact secrets from what it writes."""
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter
        handler.setFormatter(
            RedactingFormatter(fmt._fmt, fmt.datefmt) if fmt is not None else RedactingFormatter()
        )
