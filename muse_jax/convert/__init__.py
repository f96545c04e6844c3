"""Weight converters from the PyTorch peers' folders (diffusers, transformers), without torch."""
