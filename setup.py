"""Installs megatron_lpa: ``pip install torch==2.13.0 && pip install -e ".[test]"``.

With a CUDA build of PyTorch and a CUDA toolchain (nvcc), ``pip install --no-build-isolation -e .``
also compiles the fused kernels in ``csrc/`` into ``megatron_lpa._C`` (Hopper sm_90 code plus PTX
that newer GPUs compile at load; set ``TORCH_CUDA_ARCH_LIST`` for other GPUs). Without them the
package installs as pure Python and ``megatron_lpa.ops`` uses its PyTorch fallbacks. (Build
isolation hides the installed torch from this script, so the kernels need ``--no-build-isolation``.)
"""

import glob
import os

from setuptools import find_packages, setup


def cuda_extension():
    """(ext_modules, cmdclass) for csrc/, or nothing when no CUDA torch or nvcc is present."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    nvcc_flags = ["-O3", "-std=c++17"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += [
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ]
    extension = CUDAExtension(
        name="megatron_lpa._C",
        sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="megatron_lpa",
    version="0.1.0",
    description="Pretraining Low-dimensional Projected Attention (LPA) models on megatron-core",
    packages=find_packages(include=["megatron_lpa", "megatron_lpa.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
        # tools/export_hf.py, import_hf.py and generate.py; 5.x builds a tokenizer.json that
        # encodes as a SentencePiece model does (TokenizersBackend), which 4.x cannot.
        "transformers": ["transformers>=5", "tokenizers"],
        # ruff pinned: tests/test_lint.py checks the formatting, which moves between versions.
        "test": ["pytest", "tokenizers", "matplotlib", "transformers>=5", "ruff==0.17.6"],
    },
)
