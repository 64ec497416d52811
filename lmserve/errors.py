"""User-facing error types.

Every failure a user can cause (a bad file, a bad parameter, a limit exceeded) raises a
subclass of :class:`LmserveError` whose message alone explains the problem; the CLI prints
that message without a traceback and the server maps it to an HTTP error body.
"""


class LmserveError(Exception):
    """Base class for errors whose message is meant for the user."""


class ModelLoadError(LmserveError):
    """A checkpoint is missing, truncated, corrupt or of an unsupported kind."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InvalidParameterError(LmserveError, ValueError):
    """A configuration or sampling parameter is out of its allowed range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class EngineDeadError(LmserveError):
    """The engine cannot run steps any more (a tensor-parallel rank died or hung)."""


class ContextLengthError(InvalidParameterError):
    """A request does not fit the model's context window."""
