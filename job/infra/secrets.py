"""Secrets kept out of everything the job writes: redact() and the log formatter that applies it
to every log line."""

from __future__ import annotations

import logging
import os
import re

REDACTED = "***"
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>`]*")
_USERINFO = re.compile(r"^([^:]+://)[^/?#]+@")
_PATH_PARAM = re.compile(r"(;[^;/=]+=)[^;/]+")  # /path;jsessionid=...
# a query string outside a URL: a local path named after one (GAN_DATA_DIR's copy of a dataset)
_QUERY = re.compile(r"\?([\w.~%+-]+=[^\s'\"<>`]*)")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# environment variables whose values are secrets wherever they show up
_SECRET_ENV = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL)")
_MIN_SECRET_LEN = 8  # shorter values would redact ordinary words


def redact(text: str) -> str:
    """text with every secret it may hold replaced by ***: in every URL, its user:password and
    every query (or ;path parameter) value, whatever the parameter's name (the scheme, host, path
    and parameter names stay, to show where it points); AWS access key ids; the values of secret
    environment variables (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN...).

    Everything the job writes that could hold a setting's value goes through it: log lines,
    config.json and checkpoints (redact_values), model cards, metric labels."""
    text = _URL.sub(lambda m: _redact_url(m[0]), text)
    text = _QUERY.sub(lambda m: "?" + _redact_query(m[1]), text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    for name, value in os.environ.items():
        if len(value) >= _MIN_SECRET_LEN and _SECRET_ENV.search(name) and value in text:
            text = text.replace(value, REDACTED)
    return text


def redact_values(values: dict) -> dict:
    """values (settings by name) with every string value passed through redact()."""
    return {name: redact(v) if isinstance(v, str) else v for name, v in values.items()}


def _redact_url(url: str) -> str:
    head, question, query = url.partition("?")
    head = _PATH_PARAM.sub(rf"\1{REDACTED}", _USERINFO.sub(rf"\1{REDACTED}@", head))
    return head + question + _redact_query(query)


def _redact_query(query: str) -> str:
    """Every value of a query string (a fragment after it included) replaced, its names kept; a
    part without a name (?TOKEN) is a value."""
    parts = re.split(r"([&;])", query)
    for i, part in enumerate(parts):
        if i % 2 == 0 and part:
            name, equals, value = part.partition("=")
            parts[i] = name + equals + (REDACTED if value else "") if equals else REDACTED
    return "".join(parts)


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
