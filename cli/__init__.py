"""The ``stillroom`` command line (typer)."""
