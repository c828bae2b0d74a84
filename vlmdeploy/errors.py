"""Exceptions raised for bad input. Each carries a stable string ``code`` and, where it applies, the
``param`` that was wrong, so the HTTP server can map it to OpenAI's error envelope without parsing
text. Messages never contain internals (paths, addresses, library reprs)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """Bad input from the caller: the request is refused, the engine keeps serving others.
    Text that cannot be encoded (a lone UTF-16 surrogate) is one: code ``invalid_encoding``."""

    status = 400

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class ContextLengthExceeded(InvalidRequestError):
    """The prompt (image tokens included), or prompt + requested tokens, does not fit
    ``session_len``."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, code="context_length_exceeded", param=param)


class ImageError(InvalidRequestError):
    """An image could not be fetched, decoded or accepted. ``code`` is one of
    ``invalid_image_url``, ``invalid_image_format``, ``unsupported_image_type``,
    ``image_too_large``, ``image_too_small``, ``image_fetch_timeout``, or ``cancelled`` (the
    request was cancelled while its image downloaded)."""

    def __init__(self, message: str, code: str = "invalid_image_format", param: str | None = None):
        super().__init__(message, code=code, param=param)
        if code == "image_too_large":
            self.status = 413 if param == "body" else 400


class VideoError(ImageError):
    """A video could not be fetched, decoded or accepted (an ``ImageError``, so everything that
    handles image refusals handles it). ``code`` is one of ``invalid_video_url``,
    ``invalid_video_format`` (corrupt, empty, no video stream), ``unsupported_video_type``,
    ``video_too_large`` (bytes, duration, frames, pixels), ``video_fetch_timeout``,
    ``video_decode_timeout``, ``invalid_video_params`` or ``cancelled``."""


class EngineDeadError(RuntimeError):
    """The engine loop failed; every in-flight and future request fails with this."""
