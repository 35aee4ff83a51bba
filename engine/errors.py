"""The engine's exception root. ``bot`` maps these to user-facing fallbacks and exit codes."""


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class ModelNotFoundError(EngineError):
    """A configured model path does not exist (names the config key and the path)."""

    def __init__(self, key: str, path: str, hint: str = "") -> None:
        self.key = key
        self.path = path
        self.hint = hint
        message = f"{key}: model path not found: {path}"
        super().__init__(message + (f" ({hint})" if hint else ""))

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Raised in an engine process, re-raised in the runtime's: pickled by its fields.
        return type(self), (self.key, self.path, self.hint)


class ModelLoadError(EngineError):
    """A model exists but could not be loaded by any step of the fallback chain."""


class BackendUnavailableError(EngineError):
    """The generation backend is not reachable or not started."""


class GenerationAborted(EngineError):
    """A request was cancelled before it finished."""


class EngineConfigError(EngineError, ValueError):
    """The engine's configuration is invalid: one line per problem in ``problems``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:
        return type(self), (self.problems,)
