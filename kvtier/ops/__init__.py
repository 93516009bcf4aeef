"""Helpers behind the ``kvtier`` command line: benchmarks, disk-tier scans, plots."""
