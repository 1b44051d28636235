"""Applications over the phases: ``stillroom report`` pictures and ``stillroom demo``."""
