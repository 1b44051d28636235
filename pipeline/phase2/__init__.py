"""Phase 2 (``train-student``, ``evaluate``): runs, lanes, epochs, the trainer, checkpoints, metrics, and the same
batches as a data source for a loop of one's own (``source``, the public API)."""
