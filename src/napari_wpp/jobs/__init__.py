"""Runs shared by the command line and the dock widgets (no Qt, no napari).

Each job takes a spec from :mod:`napari_wpp.core.config`, yields the core's events (plus a few
of its own) and owns what both faces must do alike: input normalisation, zarr layout, grown
axes, physical pixel sizes and atomic outputs. ``cli`` and ``widgets`` build the spec, run the
job and render its events.
"""
