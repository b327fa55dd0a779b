"""guidance-rt: install with `pip install --no-build-isolation -e .` so the installed torch is used
(an isolated build environment would fetch the newest torch, a CUDA build of several GB)."""
from setuptools import find_packages, setup

setup(
    name="guidance-rt",
    version="0.1.0",
    description="Training-free guidance for diffusion models: every branch in one packed forward",
    # kernels/ lives at the top level of the repository but installs as guidance_rt.kernels
    # (never as a top-level `kernels` module: diffusers probes for a package of that name)
    packages=find_packages(include=["guidance_rt", "guidance_rt.*"]) + ["guidance_rt.kernels"],
    package_dir={"guidance_rt.kernels": "kernels"},
    package_data={"guidance_rt": ["data/*.json"]},   # the example prompt pairs (CSLG layer finding)
    python_requires=">=3.10",
    # torch is deliberately not pinned: any installed torch >= 2.4 is used as it is
    install_requires=["torch>=2.4", "diffusers==0.42.1", "transformers>=4.44", "safetensors", "tqdm",
                      "matplotlib"],                     # guidance-rt layers: the plot
    extras_require={
        # triton: the kernel tests run the Triton kernels in its interpreter on CPU;
        # pytest-xdist: the suite runs on both cores of a CI machine
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "peft", "triton", "rapidocr==3.10.0",
                 "onnxruntime"],
        # OCR evaluation (guidance_rt.eval): RapidOCR ships its ONNX models in the wheel
        "ocr": ["rapidocr==3.10.0", "onnxruntime"],
        "gpu": ["triton", "nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["guidance-rt=guidance_rt.cli:main"]},
)
