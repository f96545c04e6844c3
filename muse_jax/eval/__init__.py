"""Evaluation metrics. So far only a tokenizer's reconstruction quality (PSNR and codebook
usage, `reconstruction.py`); FID and CLIP score are not built yet."""
