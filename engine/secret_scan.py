"""The last check of the output stage: no secret leaves in anything a viewer sees.

Two kinds: the values the operator configured (tokens, keys, passwords: handed in by the
runtime, which reads them from the environment) and strings shaped like a credential
whatever their value (an API key a viewer pasted earlier, one in the persona's files). The
shapes are specific prefixes and lengths, so ordinary text ("risk-free", a hex colour, a URL)
is left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words

TOKEN_SHAPES = re.compile("|".join((
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic-style API keys
    r"\b[MNO][A-Za-z\d_-]{23,27}\.[A-Za-z\d_-]{6}\.[A-Za-z\d_-]{27,}",  # Discord bot token
    r"\boauth:[a-z0-9]{30}\b",  # Twitch chat token
    r"\bgh[pousr]_[A-Za-z0-9]{36,}",  # GitHub
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
    r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
    r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",  # a JWT
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
)))


class SecretMask:
    """Removes every configured secret from a text (longest first, so a secret containing
    another is masked whole). Logs use it as it is; replies through ``SecretScanner``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH},
                               key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def escaped(self, text: str) -> str:
        """The same, for secrets as JSON spells them inside a string."""
        for secret in self._secrets:
            text = text.replace(json.dumps(secret)[1:-1], MASK)
        return text


class SecretScanner(SecretMask):
    """The configured secrets and every credential-shaped string masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(secrets)

    def __call__(self, text: str) -> str:
        return TOKEN_SHAPES.sub(MASK, super().__call__(text))
