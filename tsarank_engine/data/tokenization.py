"""Tokenizers from a checkpoint's tokenizer.json, run as the file describes, or from its SentencePiece model.

For byte-level BPE checkpoints (Qwen, LLaMA-3, SmolLM) this is what transformers' fast tokenizer does.
For LLaMA-1/2 and Mistral, whose tokenizer.json reproduces their SentencePiece model, it is what
SentencePiece does, i.e. the slow LlamaTokenizer the paper's code used; transformers >= 5 instead rebuilds
that pipeline and differs from SentencePiece on texts that start with whitespace (7 of the 4,832 sample
texts), so there the engine follows the paper. Special tokens are added by the file's post-processor, except
that a BOS the tokenizer files declare (tokenizer_config.json, falling back to special_tokens_map.json) replaces
the one the post-processor adds, as transformers' slow tokenizer puts the declared one first (the paper's stage 2
declares `</s>` as LLaMA's BOS). The EOS token's name comes from the same files. A folder without tokenizer.json
but with the SentencePiece model tokenizer.model is run as the paper's slow LlamaTokenizer (slow_tokenizer.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from ..errors import TsarankError
from .slow_tokenizer import MODEL_FILE, SentencePieceTokenizer

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
    """A checkpoint's tokenizer: its tokenizer.json run by the tokenizers library (`backend`), or, in a folder
    without one, its SentencePiece model run as the slow LlamaTokenizer (`backend` a SentencePieceTokenizer).

    `bos_swap` = (the post-processor's BOS id, the id put in its place): the BOS the tokenizer files declare (or
    a recipe's data.bos_token) when it is another token than the one tokenizer.json's post-processor adds, as
    transformers' slow tokenizer puts the declared one first."""

    def __init__(self, backend: BackendTokenizer | SentencePieceTokenizer, eos_token: str | None = None,
                 clean_up_tokenization_spaces: bool = False, pad_token: str | None = None,
                 bos_swap: tuple[int, int] | None = None):
        self.backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_swap = bos_swap

    @classmethod
    def from_dir(cls, model_dir: str | Path, bos_token: str | None = None) -> "Tokenizer":
        """The tokenizer of the checkpoint in `model_dir`; `bos_token` (a token's text) replaces the BOS its files
        declare."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        settings = read_json(model_dir / "special_tokens_map.json") | read_json(model_dir / "tokenizer_config.json")
        special = {name: _token_text(settings.get(name)) for name in ("bos_token", "eos_token", "pad_token")}
        if bos_token:
            special["bos_token"] = bos_token
        if not path.is_file():
            if not (model_dir / MODEL_FILE).is_file():
                raise TsarankError(f"{path}: tokenizer missing (a tokenizer.json, or a SentencePiece {MODEL_FILE}, is "
                                   f"required)")
            slow = SentencePieceTokenizer(model_dir, settings, special)
            if bos_token and slow.bos is None:
                raise TsarankError(f"{model_dir}: bos_token {bos_token!r} is not a token of the tokenizer, or it "
                                   f"adds no BOS (add_bos_token false)")
            # transformers 4's default for a slow tokenizer: the space clean-up on unless the files turn it off
            return cls(slow, special["eos_token"], bool(settings.get("clean_up_tokenization_spaces", True)),
                       special["pad_token"])
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exception subclasses
            raise TsarankError(f"{path}: cannot load tokenizer ({e})") from None
        clean_up = bool(settings.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(settings.get(_FORCE_BPE_CLEANUP, False))
        )
        return cls(backend, special["eos_token"], clean_up, special["pad_token"],
                   _bos_swap(backend, special["bos_token"], bool(bos_token), model_dir))

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def size(self) -> int:
        """Token ids in use, added tokens included: the rows an embedding needs for them."""
        if isinstance(self.backend, SentencePieceTokenizer):
            return self.backend.size
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if isinstance(self.backend, SentencePieceTokenizer):
            return self.backend.encode(text, add_special_tokens)
        return self._rebound(self.backend.encode(text, add_special_tokens=add_special_tokens).ids, add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode of each text, the batch spread over threads by the Rust library."""
        if isinstance(self.backend, SentencePieceTokenizer):
            return [self.backend.encode(t, add_special_tokens) for t in texts]
        return [self._rebound(e.ids, add_special_tokens)
                for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def _rebound(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens and self.bos_swap and ids and ids[0] == self.bos_swap[0]:
            ids[0] = self.bos_swap[1]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.decode_batch([ids])[0]

    def decode_batch(self, ids: list[list[int]]) -> list[str]:
        if isinstance(self.backend, SentencePieceTokenizer):
            texts = [self.backend.decode(row) for row in ids]
        else:
            texts = self.backend.decode_batch(ids, skip_special_tokens=False)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                texts = [t.replace(old, new) for t in texts]
        return texts


def _bos_swap(backend: BackendTokenizer, bos_token: str | None, asked: bool,
              model_dir: Path) -> tuple[int, int] | None:
    """(the id tokenizer.json's post-processor puts first, the declared BOS's id) when they differ."""
    first = backend.encode("", add_special_tokens=True).ids
    wanted = None if bos_token is None else backend.token_to_id(bos_token)
    if asked and (wanted is None or len(first) != 1):
        raise TsarankError(f"{model_dir}: bos_token {bos_token!r} is not a token of the tokenizer, or its "
                           f"tokenizer.json adds no BOS to replace")
    if len(first) == 1 and wanted is not None and wanted != first[0]:
        return first[0], wanted
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON settings file (tokenizer_config.json, ...) as a dict; {} when there is none."""
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


PAD_TOKEN = "[PAD]"  # the paper's added pad token


def adds_pad_token(setting: bool | str, tokenizer: Tokenizer, family: str, vocab_rows: int,
                   model_dir: str | Path) -> bool:
    """Whether a run adds the paper's [PAD] (data.add_pad_token: true, false or "auto", the paper's rule: when the
    tokenizer has no pad token and the model is not Qwen). It takes the id after the tokenizer's last, which must
    be the embedding's next row."""
    if setting == "auto":
        setting = tokenizer.pad_token is None and not family.startswith("qwen")
    if not setting:
        return False
    if tokenizer.size != vocab_rows:
        raise TsarankError(f"{model_dir}: data.add_pad_token: the tokenizer has {tokenizer.size} ids but the model "
                           f"{vocab_rows} embedding rows, so [PAD]'s id would not be the new row (the paper resizes "
                           f"the embeddings to the tokenizer's length + 1); set data.add_pad_token = false")
    if tokenizer.backend.token_to_id(PAD_TOKEN) is not None:
        raise TsarankError(f"{model_dir}: data.add_pad_token: the tokenizer already has {PAD_TOKEN}")
    return True
