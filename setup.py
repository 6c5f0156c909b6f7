"""Installs megatron_lpa: ``pip install torch==2.13.0 && pip install -e ".[test]"``."""

from setuptools import find_packages, setup

setup(
    name="megatron_lpa",
    version="0.1.0",
    description="Pretraining Low-dimensional Projected Attention (LPA) models on megatron-core",
    packages=find_packages(include=["megatron_lpa", "megatron_lpa.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "psutil",  # megatron-core's checkpoint save needs it but does not declare it
        "numpy",
        "sentencepiece",
        "nltk",
        "zstandard",
        "tqdm",
        "tensorboard",
        "pyyaml",
        "orjson",  # fast JSON-lines parsing in tools/preprocess_data.py (json is the fallback)
        "regex",  # GPT-2 BPE pre-tokenisation
    ],
    extras_require={
        "wandb": ["wandb"],
        "transformers": ["transformers", "tokenizers"],
        "test": ["pytest", "tokenizers", "matplotlib"],
    },
)
