"""One exception root for the runtime, so callers can catch ours without catching everything."""

from __future__ import annotations

# BSD sysexits: EX_CONFIG. Operators' supervisors (systemd, docker) can tell "fix your config"
# apart from a crash.
EXIT_CONFIG = 78
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70


class BotError(Exception):
    """Root of every error the runtime raises on purpose."""

    exit_code: int = EXIT_SOFTWARE


class ConfigError(BotError):
    """The configuration is invalid; ``problems`` holds one line per mistake."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems))


class MissingSecretError(ConfigError):
    """An enabled adapter needs a secret that is not in the environment."""


class AdapterUnavailableError(BotError):
    """An adapter named in config cannot be loaded (extra not installed, or unknown)."""

    exit_code = EXIT_UNAVAILABLE


class PlatformUnreachableError(BotError):
    """A chat platform could not be reached, or answered 429/5xx, while logging in. The message
    names the platform and the HTTP status or error class only: a library's own text may quote
    a URL with a client secret in it."""

    exit_code = EXIT_UNAVAILABLE

    @classmethod
    def http(cls, platform: str, status: int) -> PlatformUnreachableError:
        return cls(f"{platform} answered HTTP {status} while logging in; try again later")

    @classmethod
    def network(cls, platform: str, exc: BaseException) -> PlatformUnreachableError:
        return cls(f"cannot reach {platform} ({type(exc).__name__}): check the network")
