"""Exceptions raised by the engine.

Every message names the file (when there is one), what was expected, what was found and what to do, so a
ComfyUI user reading it in the UI can act on it without reading code.
"""


class KontextError(Exception):
    """Base class for every error the engine raises on purpose."""


class CheckpointError(KontextError):
    """A weights file cannot be used: unreadable, truncated, wrong model type, missing keys, bad shapes."""


class UnsupportedQuantError(CheckpointError):
    """A quantized tensor uses a storage type the engine cannot dequantize."""


class InputError(KontextError, ValueError):
    """An argument to the public API is out of range or inconsistent (sizes, references, steps...)."""


class NumericalError(KontextError, RuntimeError):
    """A model produced NaN/Inf (which would be saved as a black image): corrupt weights or overflow."""
