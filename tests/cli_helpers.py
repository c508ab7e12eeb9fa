"""Helpers shared by the CLI tests: run ``main`` and check the one-line error contract."""

from __future__ import annotations

import pytest

from napari_wpp.cli import main


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """Run ``napari-wpp argv…``; return the exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit code 2, exactly one ``error:`` line on stderr, no traceback, nothing on stdout."""
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert out == ""
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
