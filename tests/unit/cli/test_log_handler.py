"""The CLI's log handler writes to the stderr of the moment a record comes."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from pipeline.cli._logging import setup_logging


def test_a_handler_made_under_a_swapped_stderr_never_writes_to_it_once_closed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seen in CI: a command run by typer's CliRunner installed the handler on the runner's
    stderr, which the runner then closed; every later log record of the test session printed
    "--- Logging error --- ValueError: I/O operation on closed file" with a traceback."""
    root = logging.getLogger()
    before = list(root.handlers)
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    try:
        setup_logging("INFO")
        logging.getLogger("pipeline.test").info("during the command")
        monkeypatch.undo()
        swapped.close()
        logging.getLogger("pipeline.test").info("after the command")
        err = capsys.readouterr().err
        assert "after the command" in err
        assert "Logging error" not in err
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
