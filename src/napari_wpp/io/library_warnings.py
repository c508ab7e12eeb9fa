"""Keep the decoders' own warnings (tifffile's log lines, Pillow's and imagecodecs' warnings)
out of stderr: one ``error: …`` line stays one line, and a warning that explains a failure is
folded into that line."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["caught_library_warnings", "folded"]

#: Loggers and warning-issuing modules of the image libraries.
LIBRARY_LOGGERS = ("tifffile", "PIL", "imagecodecs")
LIBRARY_MODULES = r"(tifffile|PIL|imagecodecs)(\..*)?"


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def caught_library_warnings() -> Iterator[list[str]]:
    """Collect (instead of print) the image libraries' warnings and log lines meanwhile.

    Yields the list the messages are appended to. Other warnings pass as before.
    """
    messages: list[str] = []
    handler = _Collect(messages)
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False  # no stray line through the root or last-resort handler
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("always", module=LIBRARY_MODULES)
        try:
            yield messages
        finally:
            for logger, (propagate, level) in zip(loggers, saved, strict=True):
                logger.removeHandler(handler)
                logger.propagate = propagate
                logger.setLevel(level)
    for item in caught:
        if _from_library(item):
            messages.append(str(item.message))
        else:  # not ours to hide
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def _from_library(item: warnings.WarningMessage) -> bool:
    name = item.filename.replace("\\", "/")
    if any(f"/{lib}/" in name or name.endswith(f"/{lib}.py") for lib in LIBRARY_LOGGERS):
        return True
    return "DecompressionBomb" in item.category.__name__


def folded(messages: list[str], limit: int = 120) -> str:
    """``"; the library said: …"`` with the first message (empty without any)."""
    if not messages:
        return ""
    text = " ".join(str(messages[0]).split())
    return f"; the library said: {text[:limit]}"
