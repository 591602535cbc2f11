"""Training recipes: TOML files mapped onto typed settings (DESIGN.md, "CLI and recipes").

Every key has a type and a default unless marked required; an unknown section or key is an error naming it
and the closest valid one; a value of the wrong type is an error naming the key and the type expected.
`--set section.key=value` overrides any key, the value read as TOML (a bare word is taken as a string).
Relative paths are resolved against the recipe file's folder, so a recipe runs from any working directory;
a model path `builtin:<name>` names the embedded default model (model/builtin.py).
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tsarank_kernels.ranking_head import LossSettings

from .choices import ATTENTION, BLOCK_OPS, WIDE_DTYPES
from .errors import TsarankError
from .model.builtin import is_builtin
from .model.lora import LORA_TARGETS, LoraSettings

REQUIRED = object()  # marks a key a recipe must set


@dataclass(frozen=True)
class RunSettings:
    stage: str = "cpt"  # "cpt" (stage 1) or "sft" (stage 2)
    output_dir: str = "runs/out"
    seed: int = 0
    tensorboard: bool = False  # also write each step's metrics as TensorBoard events (the `tensorboard` extra)


@dataclass(frozen=True)
class ModelSettings:
    path: str = typing.cast(str, REQUIRED)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    attention: str = "auto"
    block_ops: str = "auto"


@dataclass(frozen=True)
class DataSettings:
    path: str = typing.cast(str, REQUIRED)
    max_tokens: int = 8192  # tokens per packed row (one forward)
    max_seq_tokens: int = 512  # stage 1: tokens per text pair (the paper's max length)
    # stage 1, a pair over max_seq_tokens: "document" cuts the document text and keeps "Document: ... Query:" +
    # query + EOS whole; "right" cuts the sequence's end (the paper's, which can push the query out)
    truncation: str = "document"
    # stage 1: EOS after the query; "auto" is the paper's rule: none for Qwen checkpoints, one for the others
    append_eos: bool | str = "auto"
    max_query_tokens: int = 32
    max_doc_tokens: int = 128
    skip_bad_rows: bool = False
    # the paper's "[PAD]": true adds it to the tokenizer and its row to the input and output embeddings (V -> V + 1,
    # the new row the mean of the others), so every softmax has V + 1 logits; "auto" is the paper's rule (added when
    # the tokenizer has no pad token, the model is not Qwen, and the tokenizer has one id per embedding row)
    add_pad_token: bool | str = False
    # the token every sequence starts with, by its text (written into the run's tokenizer files, so that scoring the
    # exported model starts with it too); "": the checkpoint's own BOS. The paper's stage 2 of LLaMA: "</s>"
    bos_token: str = ""


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 0  # 0: as many steps as `epochs` passes over the data take
    batch_size: int = typing.cast(int, REQUIRED)  # text pairs (stage 1) or query groups (stage 2) per step
    lr: float = typing.cast(float, REQUIRED)
    warmup_ratio: float = 0.0
    epochs: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    activation_checkpointing: bool = False
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient (not applied)
    # "tokens": stage 1 and L_gen, L_dp are means over the step's tokens; "paper": means per micro-batch (stage 1:
    # paper_micro_batch pairs) or per query group (stage 2), then averaged, as the paper's HF Trainer does
    loss_average: str = "tokens"
    paper_micro_batch: int = 16  # stage 1 with loss_average = "paper": pairs per micro-batch (the paper's 16)


@dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int = 0  # 0: only the final export
    keep_last: int = 2


@dataclass(frozen=True)
class SftSettings:
    group_size: int = 48
    trainable_top_blocks: int = 1
    tau: float = 0.001
    w_gen: float = 1.0
    w_dp: float = 1.0
    reference: str = ""  # the frozen stage-1 model; empty: model.path
    shared_trunk: bool = True
    # L_dp at each candidate's last position too (true); false: the paper's collator drops the last input token
    kl_last_position: bool = True
    # "one": one positive drawn per group (the paper's); "all": every positive of the query in its group (then
    # negatives up to group_size, at least one), L_rank the multi-positive softmax cross-entropy, L_gen on all
    positives: str = "one"
    # distillation from teacher scores ("score" on every passage of the groups): w_kd L_kd joins the loss, L_kd =
    # KL(softmax(teacher / t_kd) || softmax(exp(s) / tau)) over each group; 0: off, the scores not needed
    w_kd: float = 0.0
    t_kd: float = 1.0  # the teacher's temperature

    def losses(self) -> LossSettings:
        """The loss settings the ranking head reads, as one object."""
        return LossSettings(self.tau, self.w_gen, self.w_dp, self.w_kd, self.t_kd)


@dataclass(frozen=True)
class EvalSettings:
    """Reranking a dev run with the model in training (training/validation.py): off while `run` is empty."""

    run: str = ""  # first-stage TREC run; set, it needs queries, corpus and qrels
    queries: str = ""  # BEIR queries.jsonl
    corpus: str = ""  # BEIR corpus.jsonl
    qrels: str = ""  # TREC qrels
    every_steps: int = 0  # 0: only after the last step
    top_k: int = 100  # candidates per query: the run's best
    metric: str = "nDCG@10"  # an ir_measures name, averaged over the run's judged queries
    rel_threshold: int = 1  # lowest grade a binary measure (RR, R, AP, ...) counts as relevant, as `eval`'s
    keep_best: bool = False  # export the best-scoring step's model to <output_dir>/best
    max_query_tokens: int | None = None  # None: the paper's reranking (whole query, documents to a 512 budget)
    max_doc_tokens: int | None = None
    batch_tokens: int | None = None  # tokens per packed row; None: scoring's default for the device


@dataclass(frozen=True)
class ParallelSettings:
    # HSDP: the processes form replicate_degree groups (e.g. the nodes), each sharding the model over its
    # world_size / replicate_degree processes and replicating it across the groups; 1: plain FSDP over all
    replicate_degree: int = 1


@dataclass(frozen=True)
class Recipe:
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    sft: SftSettings = field(default_factory=SftSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)


_PATH_KEYS = {("run", "output_dir"), ("model", "path"), ("data", "path"), ("sft", "reference"), ("eval", "run"),
              ("eval", "queries"), ("eval", "corpus"), ("eval", "qrels")}
_CHOICES = {("run", "stage"): ("cpt", "sft"), ("model", "dtype"): ("auto", *WIDE_DTYPES),
            ("model", "attention"): ATTENTION, ("model", "block_ops"): BLOCK_OPS,
            ("data", "truncation"): ("document", "right"),
            ("data", "append_eos"): ("auto", True, False), ("data", "add_pad_token"): (False, True, "auto"),
            ("train", "loss_average"): ("tokens", "paper"),
            ("sft", "positives"): ("one", "all"), ("lora", "targets"): LORA_TARGETS}
# (smallest allowed, largest allowed or None) of numeric keys; a value outside is an error naming the key.
_BOUNDS = {("run", "seed"): (0, None), ("data", "max_tokens"): (16, None), ("data", "max_query_tokens"): (1, None),
           ("data", "max_seq_tokens"): (2, None),
           ("data", "max_doc_tokens"): (1, None), ("train", "max_steps"): (0, None), ("train", "batch_size"): (1, None),
           ("train", "lr"): (0.0, None), ("train", "warmup_ratio"): (0.0, 1.0), ("train", "epochs"): (0.0, None),
           ("train", "weight_decay"): (0.0, None), ("train", "max_grad_norm"): (0.0, None),
           ("train", "max_bad_steps"): (1, None), ("train", "paper_micro_batch"): (1, None),
           ("checkpoint", "every_steps"): (0, None), ("checkpoint", "keep_last"): (1, None),
           ("sft", "group_size"): (2, None), ("sft", "trainable_top_blocks"): (1, None), ("sft", "tau"): (1e-9, None),
           ("sft", "w_gen"): (0.0, None), ("sft", "w_dp"): (0.0, None), ("sft", "w_kd"): (0.0, None),
           ("sft", "t_kd"): (1e-9, None), ("eval", "every_steps"): (0, None),
           ("eval", "top_k"): (1, None), ("eval", "rel_threshold"): (1, None), ("eval", "max_query_tokens"): (1, None),
           ("eval", "max_doc_tokens"): (1, None), ("eval", "batch_tokens"): (1, None),
           ("parallel", "replicate_degree"): (1, None), ("lora", "rank"): (0, None), ("lora", "alpha"): (1e-9, None),
           ("lora", "dropout"): (0.0, 0.999)}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(options)})"


def _check_type(where: str, value: Any, expected: tuple[type, ...]) -> Any:
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if int in expected and bool not in expected and isinstance(value, bool) or not isinstance(value, expected):
        kinds = " or ".join(t.__name__ for t in expected if t is not type(None))  # TOML has no null to name
        raise TsarankError(f"{where} must be {kinds}, got {type(value).__name__} {value!r}")
    return value


def _apply(recipe: Recipe, section: str, key: str, value: Any, origin: str) -> Recipe:
    sections = {f.name: f for f in fields(Recipe)}
    if section not in sections:
        raise TsarankError(f"{origin}: unknown section [{section}]{_closest(section, list(sections))}")
    current = getattr(recipe, section)
    keys = {f.name: f for f in fields(current)}
    if key not in keys:
        raise TsarankError(f"{origin}: unknown key {section}.{key}{_closest(key, list(keys))}")
    names = {"str": str, "int": int, "float": float, "bool": bool, "None": type(None)}
    if str(keys[key].type) == "list[str]":
        return replace(recipe, **{section: replace(current, **{key: _names(f"{origin}: {section}.{key}", value,
                                                                            _CHOICES[section, key])})})
    expected = tuple(names[name] for name in str(keys[key].type).split(" | "))
    value = _check_type(f"{origin}: {section}.{key}", value, expected)
    low, high = _BOUNDS.get((section, key), (None, None))
    if low is not None and (value < low or (high is not None and value > high)):
        allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise TsarankError(f"{origin}: {section}.{key} must be {allowed}, got {value!r}")
    choices = _CHOICES.get((section, key))
    if choices and not any(value == c and type(value) is type(c) for c in choices):  # 1 is not True
        shown = ", ".join(c if isinstance(c, str) else str(c).lower() for c in choices)
        raise TsarankError(f"{origin}: {section}.{key} must be one of {shown}, got {value!r}")
    return replace(recipe, **{section: replace(current, **{key: value})})


def _names(where: str, value: Any, choices: tuple[str, ...]) -> list[str]:
    """A list key's value: distinct names from `choices`, at least one."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise TsarankError(f"{where} must be a non-empty list of names from {', '.join(choices)}, got {value!r}")
    for v in value:
        if v not in choices:
            raise TsarankError(f"{where}: unknown name {v!r}{_closest(v, list(choices))}")
    if len(set(value)) != len(value):
        raise TsarankError(f"{where} names {next(v for v in value if value.count(v) > 1)!r} twice")
    return list(value)


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise TsarankError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return section, key, value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe at `path` with `--set` overrides applied, every key checked, required keys present and
    relative paths resolved against the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise TsarankError(f"{path}: recipe not found")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TsarankError(f"{path}: not valid TOML ({err})") from None
    recipe = Recipe()
    for section, table in document.items():
        if not isinstance(table, dict):
            raise TsarankError(f"{path}: {section!r} must be a [section] table of keys")
        for key, value in table.items():
            recipe = _apply(recipe, section, key, value, str(path))
    for text in overrides:
        recipe = _apply(recipe, *_parse_override(text), f"--set {text}")
    for section in fields(Recipe):
        for f in fields(getattr(recipe, section.name)):
            value = getattr(getattr(recipe, section.name), f.name)
            if value is REQUIRED:
                raise TsarankError(f"{path}: {section.name}.{f.name} is required")
            if ((section.name, f.name) in _PATH_KEYS and value and not is_builtin(value)
                    and not Path(value).is_absolute()):
                recipe = replace(recipe, **{section.name: replace(getattr(recipe, section.name),
                                                                   **{f.name: os.path.normpath(path.parent / value)})})
    _check_eval(recipe.eval, str(path))
    return recipe


def _check_eval(settings: EvalSettings, origin: str) -> None:
    """With eval.run set: the files it needs are named and the metric is one ir_measures knows."""
    if not settings.run:
        return
    for key in ("queries", "corpus", "qrels"):
        if not getattr(settings, key):
            raise TsarankError(f"{origin}: eval.{key} is required when eval.run is set")
    from .rank.evaluation import parse_measures  # imports ir_measures: only for a recipe that evaluates

    try:
        parse_measures([settings.metric], settings.rel_threshold)
    except TsarankError as e:
        raise TsarankError(f"{origin}: eval.metric: {e}") from None
