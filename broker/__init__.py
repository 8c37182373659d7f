"""broker: a self-hosted, Jupyter-kernel-based code interpreter."""

__version__ = "0.1.0"
