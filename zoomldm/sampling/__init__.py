"""Model-backed samplers built on ``zoomldm.diffusion``: patches, large images, super-resolution."""
