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


def train_spec_with(**defaults: object) -> type:
    """A :class:`~napari_wpp.core.config.TrainSpec` whose fields take these defaults.

    Monkeypatched over ``napari_wpp.core.config.TrainSpec``, it stands for an edit of the
    spec's defaults (the faces read the spec class when they build their options and runs).
    """
    import copy
    from dataclasses import dataclass, field, fields

    from napari_wpp.core.config import TrainSpec

    namespace: dict[str, object] = {"__annotations__": {}}
    for item in fields(TrainSpec):
        if item.name not in defaults:
            continue
        value = defaults[item.name]
        namespace["__annotations__"][item.name] = item.type  # type: ignore[index]
        if isinstance(value, (dict, list)):
            namespace[item.name] = field(
                default_factory=lambda v=value: copy.deepcopy(v), metadata=item.metadata
            )
        else:
            namespace[item.name] = field(default=value, metadata=item.metadata)
    return dataclass(frozen=True)(type("ChangedTrainSpec", (TrainSpec,), namespace))
