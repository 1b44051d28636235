"""Inspecting caches: ``cache-status`` (with teacher comparison) and ``verify-cache``."""
