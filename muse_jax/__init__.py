"""muse_jax: Muse (Chang et al. 2023, arXiv 2301.00704) in JAX/Flax, sharded."""

__version__ = "0.1.0"
