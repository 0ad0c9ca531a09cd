"""Logging setup: the only place that installs handlers (the CLI and Dask workers call it)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "setup_logging"]

#: Third-party loggers that may quote header values (identifiers): errors only.
_QUIET = ("pydicom", "pynetdicom", "highdicom", "distributed", "dicomweb_client", "py.warnings")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception class if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__
        return json.dumps(out, ensure_ascii=False)


class _QuietThirdParty(logging.Filter):
    """Drop third-party records below ERROR.

    A filter on our handler, not logger levels: pydicom and distributed reset their own loggers'
    levels when they are imported, which may happen after this setup.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return not any(record.name == q or record.name.startswith(q + ".") for q in _QUIET)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not the stream of the moment
    the handler was made: a caller that swaps stderr (a test runner capturing a command's
    output) and closes it afterwards must not leave a handler writing to a closed file."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Route pacsflow's log records to stderr as text or JSON lines.

    Third-party libraries that may print header values (pydicom's validation warnings quote
    them) are kept at ERROR, so identifiers do not reach logs.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pacsflow", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._pacsflow = True  # type: ignore[attr-defined]
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_QuietThirdParty())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)
