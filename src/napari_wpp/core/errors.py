"""Errors raised for bad user input.

Every ``InputError`` message is one line that names the fix; the CLI prints it as
``error: <message>`` and napari shows it as a notification.
"""


class InputError(ValueError):
    """Bad user input (shape, dtype, value, file); the message names the fix."""


class DivergenceError(RuntimeError):
    """An optimisation produced NaN/Inf; the message says which knob to turn down."""
