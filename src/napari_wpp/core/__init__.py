"""Core algorithms: numpy and torch only (no Qt, no napari, no file formats)."""
