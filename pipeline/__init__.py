"""stillroom: offline knowledge distillation with a cached, view-exact teacher."""

__version__ = "0.1.0"
