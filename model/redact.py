"""Keeping credentials out of messages: URLs may carry user:password@ or a presigned query string."""
from __future__ import annotations

from urllib.parse import urlsplit


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that may hold credentials: user:password@ and the query string (presigned URLs)."""
    secrets = []
    for part in url.split("::"):  # fsspec chains URLs: simplecache::s3://bucket/path
        split = urlsplit(part)
        if "@" in split.netloc:
            secrets.append(split.netloc.rsplit("@", 1)[0])
        if split.query:
            secrets.append(split.query)
    return secrets


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """The URL as it may appear in logs and errors."""
    return scrub(url, url_secrets(url))
