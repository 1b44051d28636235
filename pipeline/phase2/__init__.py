"""Phase 2 (``train-student``, ``evaluate``): runs, lanes, epochs, the trainer, checkpoints, metrics."""
