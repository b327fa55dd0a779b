"""guidance-rt: install with `pip install --no-build-isolation -e .` so the installed torch is used
(an isolated build environment would fetch the newest torch, a CUDA build of several GB)."""
from setuptools import find_packages, setup

setup(
    name="guidance-rt",
    version="0.1.0",
    description="Training-free guidance for diffusion models: every branch in one packed forward",
    packages=find_packages(include=["guidance_rt", "guidance_rt.*"]),
    python_requires=">=3.10",
    # torch is deliberately not pinned: any installed torch >= 2.4 is used as it is
    install_requires=["torch>=2.4", "diffusers==0.42.1", "transformers>=4.44", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft"],
        "gpu": ["triton", "nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["guidance-rt=guidance_rt.cli:main"]},
)
