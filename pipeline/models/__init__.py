"""Models: teachers (weights and identity), students, targets, losses and the distillation task."""
