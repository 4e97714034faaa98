"""Errors the inference core raises; callers map them to HTTP statuses or row errors."""


class InferenceError(Exception):
    """Base class of every error the core raises on purpose."""


class ModelNotFoundError(InferenceError):
    """No such model (or version, or variant) in the source."""


class IntegrityError(InferenceError):
    """A model file's sha256 does not match its manifest: it is never served."""


class InputLimitError(InferenceError):
    """An input is over a model limit (count, size, pixels)."""


class ImageDecodeError(InferenceError):
    """Bytes that are not a decodable image, or a decompression bomb."""


class WrongTaskError(InferenceError):
    """A model used for a task it does not do (an image model asked for embeddings)."""


class BadInputError(InferenceError, ValueError):
    """An input the model cannot take as given: bad base64, text that is not valid Unicode, a wrong type."""


class UnknownVariantError(InferenceError, ValueError):
    """A variant the model does not have (a 400: the model exists, the request names no variant of it)."""


class BadModelRefError(ModelNotFoundError):
    """A model reference that is not `name`, `name@version` or `name@alias` (no such model: a 404)."""
