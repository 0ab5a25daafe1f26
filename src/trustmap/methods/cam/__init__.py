"""CAM family."""
