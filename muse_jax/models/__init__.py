"""Flax linen modules only: explicit typed fields, no config objects, no I/O."""
