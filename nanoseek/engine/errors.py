"""EngineError: a request the engine refuses, typed so a front end can answer it without parsing messages."""

from __future__ import annotations

INVALID_VALUE = "invalid_value"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class EngineError(ValueError):
    """A bad prompt or sampling parameter: `param` names the input at fault (`prompt`, or a SamplingParams
    field), `code` says what is wrong in OpenAI's error-code vocabulary.

    A ValueError, so callers that catch ValueError keep working.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = INVALID_VALUE):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
