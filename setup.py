"""Installs muse_jax: `pip install -e .` (runtime) or `pip install -e '.[test]'`."""

import pathlib

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent

setup(
  name="muse_jax",
  version="0.1.0",
  description="Muse (masked generative transformers for text-to-image) in JAX/Flax, sharded.",
  long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.10",
  packages=find_packages(include=["muse_jax", "muse_jax.*"]),
  include_package_data=True,
  install_requires=[
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "absl-py>=2.1.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "tqdm>=4.66",
    "safetensors>=0.4.3",
    "tokenizers>=0.20",
    "sentencepiece>=0.2.0",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.9",
    "array-record>=0.8.1",
    "tensorboardX>=2.6.2",
    "etils[epath]>=1.7",
  ],
  extras_require={
    "test": ["pytest>=8.0", "pytest-xdist>=3.6", "ruff>=0.6"],
    # libtpu matching the installed jax, for ahead-of-time TPU compiles on a CPU host.
    "tpu": ["jax[tpu]>=0.10.2"],
    # Only for regenerating golden fixtures from the PyTorch peers; never needed by tests.
    "reference": ["torch==2.13.0", "diffusers>=0.30", "transformers>=4.45", "scikit-image>=0.24"],
  },
  entry_points={"console_scripts": ["muse-jax=muse_jax.main:run"]},
  classifiers=[
    "Programming Language :: Python :: 3",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
  ],
)
