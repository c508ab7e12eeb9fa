"""napari-wpp: superresolution of 3D material scans with Wasserstein Patch Priors."""

__version__ = "0.1.0"

__all__ = ["__version__"]
