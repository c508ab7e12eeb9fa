"""Shared pytest fixtures for napari-wpp."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

#: ``../shared/data``, or ``$NAPARI_WPP_DATA`` where the checkout has no ``../shared`` beside it.
SHARED_DATA = Path(
    os.environ.get("NAPARI_WPP_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real test data (``../shared/data``); skips the test when absent."""
    if not (SHARED_DATA / "sic").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (its README lists the files)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sic_dir(shared_data: Path) -> Path:
    """``../shared/data/sic`` (SiC Diamonds); skips when absent."""
    return shared_data / "sic"


def _file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"real data file {path} not found")
    return path


@pytest.fixture(scope="session")
def shared_file(shared_data: Path):
    """Function ``shared_file("sic/hr_SiC.png") -> Path`` that skips when the file is absent."""
    return lambda name: _file(shared_data, name)


_QT_FIXTURES = {"qapp", "qtbot", "make_napari_viewer", "make_napari_viewer_proxy"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a display on Linux, skip every test that would start Qt (it would abort)."""
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or os.environ.get("QT_QPA_PLATFORM")
    ):
        return
    skip = pytest.mark.skip(reason="no display for Qt/napari: run the tests under `xvfb-run -a`")
    for item in items:
        if _QT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


@pytest.fixture
def errors():
    """Messages of every error notification napari shows during the test."""
    pytest.importorskip("napari")
    from napari.utils.notifications import NotificationSeverity, notification_manager

    messages: list[str] = []

    def collect(notification) -> None:
        if notification.severity == NotificationSeverity.ERROR:
            messages.append(str(notification.message))

    notification_manager.notification_ready.connect(collect)
    yield messages
    notification_manager.notification_ready.disconnect(collect)
