"""The presets (YAML configs), installed with the package as ``pipeline.presets``: see ``stillroom presets``."""
