"""Install gigatron: the top-level folders become subpackages of the one namespace `gigatron`.

`core/` installs as `gigatron.core`, `parallel/` as `gigatron.parallel`, and so on. `gigatron` itself
is an implicit namespace package (PEP 420), so no file has to sit at the repository root. Both
`pip install .` and `pip install -e .` honour `package_dir`.
"""

from setuptools import find_packages, setup

FOLDERS = ["core", "parallel", "kernels", "data_pipeline", "cluster"]
DATA = ["webdataset==1.0.2", "av>=18", "pillow", "braceexpand", "nvidia-dali-cuda120==2.4.0", "xxhash", "zstd",
        "python-snappy", "Brotli", "catalogue"]

packages, package_dir = [], {}
for folder in FOLDERS:
    for sub in [""] + find_packages(folder):
        name = f"gigatron.{folder}" + (f".{sub}" if sub else "")
        packages.append(name)
        package_dir[name] = folder + ("/" + sub.replace(".", "/") if sub else "")

setup(
    name="gigatron",
    version="0.1.0",
    description="Distributed large-scale pretraining in PyTorch: 4D parallelism, Llama 3, Movie Gen, ViTs",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"gigatron.cluster": ["*.sh"]},
    install_requires=[
        # GPU clusters keep their own torch. The floor is the oldest torch the engine targets (the GPU
        # lab machine's 2.11, with Triton 3.6); the few 2.13-only names have fallbacks
        # (parallel/comm.py). Tested here on 2.13 (CPU); the CPU set-up pins torch==2.13.0 (README).
        "torch>=2.11",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "tiktoken",
        "llama-models>=0.3",  # ships Meta's Llama 3 tokenizer.model (its own deps are light, no torch)
        "safetensors",
    ],
    extras_require={
        "cpu": ["torch==2.13.0"],
        # image/video readers: WebDataset, PyAV, DALI (CPU pipelines work without a GPU), and the small
        # deps of mosaicml-streaming, which itself installs with --no-deps (it would replace a pinned torch)
        "data": DATA,
        "test": ["pytest", "transformers>=4.57", "matplotlib", "pillow", "triton", "scikit-learn", "scikit-image",
                 "scikit-video", *DATA],
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={"console_scripts": ["gigatron=gigatron.core.cli:main"]},
)
