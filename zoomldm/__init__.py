"""zoomldm-bench: a runnable replication suite for ZoomLDM (CVPR 2025)."""
__version__ = "0.1.0"
