"""Image-text sources, the grain input pipeline, pre-encoding and the synthetic shapes set."""
