"""fairseq-longmem: LongMem (memory-augmented LMs) as a plugin for stock fairseq.

Install torch first (pinned), then fairseq without its dependencies (its
``torchaudio`` requirement would pull another torch), then this package; see
README.md and requirements.txt.
"""

from setuptools import setup

setup(
    name="fairseq-longmem",
    version="0.1.0",
    description="LongMem (Wang et al., NeurIPS 2023) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=[
        "fairseq_longmem",
        "fairseq_longmem.tasks",
        "fairseq_longmem.data",
        "fairseq_longmem.models",
        "fairseq_longmem.modules",
        "fairseq_longmem.criterions",
        "fairseq_longmem.eval",
        "fairseq_longmem.preprocess",
    ],
    package_dir={"fairseq_longmem.preprocess": "preprocess"},
    # compiled on first use by fairseq_longmem.modules.cpu_kernels
    package_data={"fairseq_longmem": ["csrc/*.cpp"]},
    # fairseq itself is not listed: PyPI's fairseq 0.12.2 does not build on
    # Python >= 3.11 and its torchaudio requirement drags in another torch.
    # Install a fairseq build yourself (README: "Install").
    install_requires=[
        "torch>=1.13",
        "numpy",
        "sentencepiece",
        "faiss-cpu",
        "omegaconf",
        "hydra-core",
        "ninja",
    ],
    extras_require={
        "plots": ["matplotlib"],
        # longmem-import-hf / --tokenizer read local files with these; transformers only in tests
        "hf": ["safetensors", "tokenizers"],
        "test": ["pytest", "transformers", "tokenizers", "safetensors"],
    },
    entry_points={
        "console_scripts": [
            "longmem-train = fairseq_longmem.cli:train",
            "longmem-eval-lm = fairseq_longmem.cli:eval_lm",
            "longmem-preprocess = fairseq_longmem.preprocess.prepare_corpus:main",
            "longmem-report = fairseq_longmem.eval.report:main",
            "longmem-generate = fairseq_longmem.generate:main",
            "longmem-import-hf = fairseq_longmem.cli:import_hf",
            "longmem-recall = fairseq_longmem.eval.recall:main",
            "longmem-synthetic-recall = fairseq_longmem.data.synthetic_recall:main",
            "longmem-build-kernels = fairseq_longmem.modules.cpu_kernels:main",
        ]
    },
)
