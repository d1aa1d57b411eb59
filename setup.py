from setuptools import find_packages, setup

setup(
    name="imagen_ds",
    version="0.1.0",
    description="Train the Imagen text-to-image cascade on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["imagen_ds", "imagen_ds.*"]),
    python_requires=">=3.10",
    # torch is pinned by the Makefile before this package is installed (a CPU build on
    # CI); here any recent torch satisfies, so pip never pulls a CUDA build on top.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "webdataset>=0.2.86",
        "click>=8.1",
        "pyyaml>=6",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8", "scipy>=1.10"],
        "wandb": ["wandb>=0.17"],
        "eval": ["torchmetrics>=1.4", "scipy>=1.10", "matplotlib>=3.7"],
        # the real Inception-v3 FID network (torchmetrics uses torch-fidelity's); it pulls torchvision,
        # so it is kept out of "eval" (the CPU test venv); install it where torchvision fits your torch
        "fid": ["torch-fidelity>=0.3"],
    },
    entry_points={"console_scripts": ["imagen-ds=imagen_ds.cli:main"]},
)
