"""Database URL helpers that need no database driver."""

from __future__ import annotations


def mask_url(url: str) -> str:
    """Hide a password in a database URL (``user:secret@host`` → ``user:***@host``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"
