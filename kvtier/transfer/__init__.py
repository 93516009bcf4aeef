"""Transfers: the copy-engine seam, disk I/O and the per-path transfer manager."""
