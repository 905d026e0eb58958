"""Exceptions raised on bad input; each names the offending value and the parameter.

The server maps them to OpenAI-style JSON errors (400/404/422/429).
"""

from __future__ import annotations


class JaxserveError(Exception):
    """Base class for errors the user can fix."""


class InvalidRequestError(JaxserveError, ValueError):
    """A request field is out of range or malformed (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt (plus max_tokens) does not fit the model's context (HTTP 400)."""


class ModelNotFoundError(JaxserveError, FileNotFoundError):
    """`--model` names no known preset and no existing file or directory (HTTP 404)."""


class UnsupportedModelError(JaxserveError, ValueError):
    """A model file is corrupt or uses an unsupported architecture or quantisation."""


class QueueFullError(JaxserveError):
    """The waiting queue is at `max_waiting` (HTTP 429)."""


class LoraAdapterError(JaxserveError, ValueError):
    """A LoRA adapter cannot be read or does not fit the base model or the LoRA buffers (400)."""


class LoraNotFoundError(JaxserveError, LookupError):
    """A request or unload names an adapter that is not loaded (HTTP 404)."""
