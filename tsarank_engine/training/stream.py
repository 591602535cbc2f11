"""The stream a recipe trains on: its data file, tokenized and packed as its [data], [train] and [sft] say."""

from __future__ import annotations

from ..data.packing import Packer
from ..data.readers import SkipCounter
from ..data.sequences import CptBuilder, GroupBuilder, cpt_eos
from ..data.stream import PackedStream
from ..data.tokenization import Tokenizer
from ..recipe import Recipe


def recipe_stream(recipe: Recipe, tokenizer: Tokenizer, model_family: str,
                  skips: SkipCounter | None = None) -> PackedStream:
    """A step (train.batch_size units) per window; model_family (the checkpoint's) decides append_eos =
    "auto"."""
    data, train = recipe.data, recipe.train
    if recipe.run.stage == "cpt":
        units = CptBuilder(tokenizer, min(data.max_seq_tokens, data.max_tokens), data.truncation,
                           cpt_eos(model_family, data.append_eos))
    else:
        units = GroupBuilder(tokenizer, recipe.sft.group_size, data.max_query_tokens, data.max_doc_tokens,
                             recipe.sft.positives, teacher_scores=recipe.sft.w_kd > 0)
    packer = Packer(data.max_tokens, train.loss_average, train.paper_micro_batch, recipe.sft.kl_last_position)
    return PackedStream(data.path, units, packer, seed=recipe.run.seed, window=train.batch_size, skips=skips)
