"""Phase 1 (``cache-teacher``): replayed units through the teacher into the cache."""
