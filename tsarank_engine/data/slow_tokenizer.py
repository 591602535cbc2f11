"""The slow LlamaTokenizer of transformers 4 (the paper's): a checkpoint's SentencePiece model, tokenizer.model,
with the tokens added beside it, for folders that ship no tokenizer.json (LLaMA checkpoints saved with the slow
tokenizer, as the paper's released rankers were).

What it computes, as transformers 4.28's LlamaTokenizer: a text is split at every added or special token
(whitespace beside one is dropped unless its record says lstrip/rstrip false: a token written as a plain
string drops both); each piece between them is SentencePiece's encoding, each token its id; the BOS is put
first when `add_bos_token` (default true) and the EOS last when `add_eos_token` (default false). Decoding gives
SentencePiece's text of each run of ordinary ids, a special token's text after a space unless it follows another
special token or starts the text, and an added token outside the SentencePiece vocabulary joined by spaces.
SentencePiece itself is read with the `sentencepiece` package (the `sentencepiece` extra).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import TsarankError

MODEL_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"


class SentencePieceTokenizer:
    """encode/decode with the slow tokenizer's rules (see the module's docstring); `size` counts added tokens."""

    def __init__(self, model_dir: Path, settings: dict[str, Any], special: dict[str, str | None]):
        try:
            import sentencepiece
        except ImportError:
            raise TsarankError(f"{model_dir}: its tokenizer is a SentencePiece model ({MODEL_FILE}, no tokenizer.json)"
                               f", read with the sentencepiece package: pip install 'tsarank-engine[sentencepiece]'"
                               ) from None
        path = model_dir / MODEL_FILE
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TsarankError(f"{path}: cannot load the SentencePiece model ({e})") from None
        pieces = self.sp.get_piece_size()
        # content -> (id, lstrip, rstrip): the special tokens, then the added ones (new ids past the pieces)
        self.tokens: dict[str, tuple[int, bool, bool]] = {}
        for name, value in settings.items():
            if name.endswith("_token") or name == "additional_special_tokens":
                for record in value if isinstance(value, list) else [value]:
                    self._add(record, None, model_dir)
        for key, record in (settings.get("added_tokens_decoder") or {}).items():
            self._add(record, int(key), model_dir)
        added = model_dir / ADDED_TOKENS_FILE
        if added.is_file():
            try:
                table = json.loads(added.read_text())
                items = [(str(content), int(i)) for content, i in table.items()]
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                raise TsarankError(f"{added}: expected a JSON object of token -> id") from None
            for content, i in items:
                self._add(content, i, model_dir)
        self.size = max([pieces - 1] + [i for i, _, _ in self.tokens.values()]) + 1
        self.text_of = {i: content for content, (i, _, _) in self.tokens.items()}
        self.pieces = pieces
        found = sorted(self.tokens, key=len, reverse=True)  # the longest token wins where two start together
        self.pattern = re.compile("|".join(map(re.escape, found))) if found else None
        self.bos = self._special_id(special.get("bos_token")) if settings.get("add_bos_token", True) else None
        self.eos = self._special_id(special.get("eos_token")) if settings.get("add_eos_token", False) else None

    def _add(self, record: Any, token_id: int | None, model_dir: Path) -> None:
        # a plain string drops the whitespace on both sides (transformers 4's default for special tokens)
        if isinstance(record, dict):
            content, lstrip, rstrip = record.get("content"), bool(record.get("lstrip")), bool(record.get("rstrip"))
        else:
            content, lstrip, rstrip = record, True, True
        if not isinstance(content, str) or not content or content in self.tokens and token_id is None:
            return
        if token_id is None:
            token_id = self.sp.piece_to_id(content)
            if token_id == self.sp.unk_id() and content != self.sp.id_to_piece(token_id):
                return  # named in the settings but in no vocabulary: transformers would add it; nothing to split
        self.tokens[content] = (token_id, lstrip, rstrip)

    def _special_id(self, content: str | None) -> int | None:
        return None if content is None else self.token_to_id(content)

    def token_to_id(self, content: str) -> int | None:
        if content in self.tokens:
            return self.tokens[content][0]
        i = self.sp.piece_to_id(content)
        return None if i == self.sp.unk_id() and content != self.sp.id_to_piece(i) else i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        parts: list[str | int] = []  # texts and token ids
        last = 0
        for match in self.pattern.finditer(text) if self.pattern else ():
            _, lstrip, rstrip = self.tokens[match.group()]
            before = text[last : match.start()]
            parts += [before.rstrip() if lstrip else before, self.tokens[match.group()][0]]
            last = match.end()
            if rstrip:
                while last < len(text) and text[last].isspace():
                    last += 1
        parts.append(text[last:])
        ids = [] if not add_special_tokens or self.bos is None else [self.bos]
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
            elif part:
                ids += self.sp.encode(part)
        if add_special_tokens and self.eos is not None:
            ids.append(self.eos)
        return ids

    def decode(self, ids: list[int]) -> str:
        texts: list[str] = []  # joined by spaces at tokens outside the SentencePiece vocabulary
        out, run, after_special = "", [], False
        for i in ids:
            if i >= self.pieces:
                texts += [out + self.sp.decode(run), self.text_of.get(i, "")]
                out, run, after_special = "", [], False
            elif i in self.text_of:
                out += ("" if after_special or not (out or run) else " ") + self.sp.decode(run) + self.text_of[i]
                run, after_special = [], True
            else:
                run.append(i)
                after_special = False
        texts.append(out + self.sp.decode(run))
        return " ".join(t for t in texts if t)
