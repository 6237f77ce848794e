"""rlstitch: diffusion alignment with Stitched Value Models (the Ray-free core)."""

__version__ = "0.1.0"
