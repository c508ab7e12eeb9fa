"""Turn exceptions into one-line napari notifications with a hint on what to do next.

Widgets never let a user mistake or an out-of-memory error reach napari's traceback dialog:
they catch it and call :func:`notify_error`, which shows the message plus a short hint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from napari_wpp.core.errors import DivergenceError, InputError, QuestionableInputWarning


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of torch (CUDA/MPS/CPU allocator) or the host."""
    from napari_wpp.core.allocation import is_allocation_failure

    return is_allocation_failure(exc)


_NO_GPU_PHRASES = ("not available", "no cuda", "not compiled", "no nvidia", "invalid device")


def _is_missing_cuda(exc: BaseException) -> bool:
    """Whether ``exc`` says that CUDA (or MPS) was asked for but is not available."""
    text = str(exc).lower()
    missing_cuda = "cuda" in text and any(phrase in text for phrase in _NO_GPU_PHRASES)
    return missing_cuda or ("mps" in text and "not available" in text)


def hint_for(exc: BaseException) -> str:
    """A one-line hint on what to change after ``exc`` (empty when there is nothing to add).

    Parameters
    ----------
    exc
        The exception a widget caught.

    Returns
    -------
    str
        For out of memory: use a smaller batch or tile; for a missing GPU: use the CPU; for a
        diverging optimisation: lower λ or ρ; for bad input the message already
        names the fix, so the hint is empty.
    """
    if _is_out_of_memory(exc):
        from napari_wpp.core.allocation import out_of_memory_message

        return out_of_memory_message(
            exc, "use a smaller batch size, crop size, tile size, image, scale or kernel"
        )
    if _is_missing_cuda(exc):
        return "this GPU is not available here: choose device 'cpu' (or 'auto')"
    if isinstance(exc, DivergenceError):
        return "the optimisation diverged: lower λ (or ρ), use a larger batch or another seed"
    if isinstance(exc, InputError):
        return ""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return "check the file path and its permissions"
    return ""


def error_message(exc: BaseException) -> str:
    """The one-line text :func:`notify_error` shows for ``exc``."""
    from napari_wpp.core.allocation import allocation_size

    if _is_out_of_memory(exc) and allocation_size(exc) is not None:
        return hint_for(exc)  # the allocator's own text is long and says no more
    lines = str(exc).strip().splitlines()
    first_line = lines[0] if lines else ""
    message = first_line or type(exc).__name__
    if not isinstance(exc, InputError) and first_line:
        message = f"{type(exc).__name__}: {first_line}"
    hint = hint_for(exc)
    return f"{message} — {hint}" if hint else message


def notify_error(exc: BaseException) -> None:
    """Show ``exc`` as a napari error notification with a one-line hint (never raises).

    Parameters
    ----------
    exc
        The exception a widget or worker produced.
    """
    from napari.utils.notifications import show_error

    show_error(error_message(exc))


@contextmanager
def notified_warnings() -> Iterator[None]:
    """Show each :class:`QuestionableInputWarning` raised meanwhile as a napari warning.

    Other warnings go on as before. (Warnings in thread workers reach napari through the
    worker's ``warned`` signal.)
    """
    from napari.utils.notifications import show_warning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QuestionableInputWarning)
        try:
            yield
        finally:
            shown: set[str] = set()
            for item in caught:
                if issubclass(item.category, QuestionableInputWarning):
                    if str(item.message) not in shown:
                        shown.add(str(item.message))
                        show_warning(str(item.message))
                else:
                    warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def notify_warning(message: str) -> None:
    """Show ``message`` as a napari warning notification (questionable input, the run goes on)."""
    from napari.utils.notifications import show_warning

    show_warning(message)
