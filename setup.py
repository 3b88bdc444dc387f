"""nemo-plrd: Progressive Low-Rank Decomposition for the Megatron / NeMo training stack.

Lower bounds only: inside a NeMo container `pip install -e .` must keep the container's
own CUDA builds of torch, megatron-core and transformer-engine. The CPU install path
(scripts/setup.sh) pins torch==2.13.0 first so that no CUDA wheel is pulled.
"""

from setuptools import find_packages, setup

setup(
    name="nemo-plrd",
    version="0.1.0",
    description="Progressive Low-Rank Decomposition (PLRD) for Megatron-Core / Megatron-Bridge",
    packages=find_packages(include=["nemo_plrd", "nemo_plrd.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.45",
        "safetensors>=0.4",
        "lm-eval>=0.4.5",
        "gguf",  # the embedded default parent ships as a GGUF file
        "mwparserfromhell",  # the embedded Wikipedia articles are wikitext
        "accelerate",  # transformers needs it to load GGUF
        "psutil",  # megatron dist_checkpointing
        "filelock",  # one process builds each cached asset
        "omegaconf>=2.3",  # recipes: YAML, interpolations and overrides as Megatron-Bridge reads them
        "hydra-core>=1.3",  # Hydra's override grammar (Bridge's process_config_with_overrides)
        "numpy",
        "tqdm",
        "matplotlib",  # the family report's plot
    ],
    # apex and transformer-engine are used when present; never the unrelated PyPI `apex`.
    extras_require={
        "test": ["pytest>=8"],
        # plrd submit --launcher nemo-run; nemo-run 0.11 imports only with leptonai < 0.47
        "slurm": ["nemo-run>=0.11.1", "leptonai<0.47"],
    },
    entry_points={"console_scripts": ["plrd=nemo_plrd.cli:main"]},
)
