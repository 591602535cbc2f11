"""Tokenizers from a checkpoint's tokenizer.json, run as the file describes.

For byte-level BPE checkpoints (Qwen, LLaMA-3, SmolLM) this is what transformers' fast tokenizer does.
For LLaMA-1/2 and Mistral, whose tokenizer.json reproduces their SentencePiece model, it is what
SentencePiece does, i.e. the slow LlamaTokenizer the paper's code used; transformers >= 5 instead rebuilds
that pipeline and differs from SentencePiece on texts that start with whitespace (7 of the 4,832 sample
texts), so there the engine follows the paper. Special tokens are added by the file's post-processor; the
EOS token's name comes from tokenizer_config.json, falling back to special_tokens_map.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from ..errors import TsarankError

# transformers' `clean_up_tokenization`, applied after decoding when the checkpoint asks for it. Like
# transformers >= 5.7 it is skipped for BPE models (it would eat real spaces before punctuation) unless
# the checkpoint forces it with the flag below (transformers 5.0-5.6 applied it to BPE models too).
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)

_FORCE_BPE_CLEANUP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        eos_token: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        self.eos_token = eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TsarankError(f"{path}: tokenizer missing (a tokenizer.json is required)")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exception subclasses
            raise TsarankError(f"{path}: cannot load tokenizer ({e})") from None
        settings = _read_json(model_dir / "special_tokens_map.json") | _read_json(model_dir / "tokenizer_config.json")
        clean_up = bool(settings.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(settings.get(_FORCE_BPE_CLEANUP, False))
        )
        return cls(backend, eos_token=_token_text(settings.get("eos_token")), clean_up_tokenization_spaces=clean_up)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode of each text, the batch spread over threads by the Rust library."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int]) -> str:
        return self.decode_batch([ids])[0]

    def decode_batch(self, ids: list[list[int]]) -> list[str]:
        texts = self.backend.decode_batch(ids, skip_special_tokens=False)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                texts = [t.replace(old, new) for t in texts]
        return texts


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TsarankError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TsarankError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    # A special token is written either as its text or as an AddedToken object with a "content" field.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
