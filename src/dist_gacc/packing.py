"""Padding-free micro-batches (`trainer.packing`): the texts of a micro-batch laid end to end in rows, no pad
token computed, the same math as the padded batch.

A packed batch holds the same examples as the padded one, in the same order:
- `input_ids`, `position_ids` (restarting for every text), `token_type_ids` (where the tokenizer gives them):
  [rows, longest row]; a row holds whole texts, at most `max_tokens` tokens (a longer text gets a row alone);
  a row's trailing padding gets positions of its own, so no text extends into it;
- `pool_index` [texts]: the flat position (row * row length + column) of the token each text's head reads: the
  first token for encoders, the last real (not pad) token for decoders, as the model's own head picks it;
- `text_spans` [texts, 2]: each text's flat start and length (oom.EvalForward re-packs slices of a batch);
- `labels` [texts, ...] as the padded collator stacks them.

Why by hand: transformers builds the attention of packed rows (`masking_utils` detects texts from position ids
that restart when `attention_mask` is None and no cache is used, and gives SDPA and eager a block-diagonal
mask: a text attends to itself only), and `DataCollatorWithFlattening` packs for language modelling, but it
refuses sequence labels and every classification head pools one position per ROW (BERT's pooler `hidden[:, 0]`,
GenericForSequenceClassification one last token per row). `enable` gives the model a forward that runs its own
body on the rows and its own head modules on each text's pooled token. It is the model's own forward
(an instance attribute, not a wrapper module), so Accelerate prepares the plain transformers model: DDP, FSDP2
and DeepSpeed see a normal forward, checkpoints hold the same keys, and model/ is the plain model. A padded
batch (no `pool_index`) runs the class's forward unchanged (predict.py, pipeline, verify_equivalence's
reference).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

PACKED_KEYS = ("pool_index", "text_spans")
CHECK_TEXTS = 48          # real training texts compared packed vs padded at build (eval mode)
CHECK_ROW_TOKENS = 96     # the check's row length: short, so its texts span several rows and rows end in padding
CHECK_TOLERANCE = 1e-4    # |packed - padded| logits, relative to 1 + the largest |logit| (fp32 sums differ ~1e-6)


# --- the model side: per-text pooling through the model's own head -----------------------------------

@dataclass(frozen=True)
class Head:
    """How a sequence classifier reads a text: `pool` "first" (encoders) or "last" (decoders: the last token that
    is not pad), and `logits(model, pooled)` the model's own head modules on one pooled hidden state per text."""
    kind: str
    pool: str
    logits: Callable


def _bert_head(model, pooled):
    # BertForSequenceClassification: pooler (dense + tanh of the first token) -> dropout -> classifier
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        pooled = pooler(pooled[:, None])
    return model.classifier(model.dropout(pooled))


def _first_token_head(model, pooled):
    # RoBERTa, XLM-R, CamemBERT, ELECTRA: a head module that reads features[:, 0] itself
    return model.classifier(pooled[:, None])


def _score_head(model, pooled):
    # GenericForSequenceClassification (Llama, Qwen2, Mistral, Gemma, Phi-3) and GPT-2: `score` is per token,
    # so scoring the pooled token is what scoring every token and then picking the last real one gives
    return model.score(pooled)


def head_of(model) -> Head | None:
    """The model's head, or None where the architecture is not one this module knows."""
    name = type(model).__name__
    if hasattr(model, "score") and isinstance(getattr(model, "score"), torch.nn.Module):
        return Head("decoder (score on the last real token)", "last", _score_head)
    classifier = getattr(model, "classifier", None)
    if classifier is None or not name.endswith("ForSequenceClassification"):
        return None
    if hasattr(classifier, "out_proj") and hasattr(classifier, "dense"):
        return Head("encoder (classification head on the first token)", "first", _first_token_head)
    if hasattr(model, "dropout") and hasattr(model.base_model, "pooler"):
        return Head("encoder (pooler, dropout, classifier on the first token)", "first", _bert_head)
    return None


def _packed_forward(self, input_ids=None, position_ids=None, token_type_ids=None, pool_index=None,
                    text_spans=None, attention_mask=None, labels=None, **kwargs):
    """The model's forward: packed rows when the batch carries `pool_index`, the class's own forward otherwise.
    peft passes attention_mask=None, labels=None and output flags through: ignored for packed rows (the loss is
    the objective's, the mask is transformers' block-diagonal one)."""
    if pool_index is None:
        return type(self).forward(self, input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                                  attention_mask=attention_mask, labels=labels, **kwargs)
    body_kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    if self._packing_head.pool == "last":
        body_kwargs["use_cache"] = False  # a cache turns transformers' packed-row detection off
    hidden = self.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                             **body_kwargs)[0]
    pooled = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pool_index)
    # A ModelOutput (a Mapping), as the class returns: Accelerate's convert_outputs_to_fp32 reaches its logits
    return SequenceClassifierOutput(logits=self._packing_head.logits(self, pooled))


def enable(model, head: Head | None = None) -> Head | None:
    """Give `model` (the transformers model, before LoRA wraps it and before prepare) the packed forward, reading
    it through `head` (default: `head_of(model)`). Returns the head, or None (an unknown architecture: unchanged)."""
    head = head or head_of(model)
    if head is not None:
        model._packing_head = head
        model.forward = types.MethodType(_packed_forward, model)
    return head


def disable(model) -> None:
    """The class's own forward again."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_packing_head", None)


# --- the data side: the collator ---------------------------------------------------------------------

def pack_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Text indices per row: first-fit decreasing (the longest text first, each into the first row with room), rows
    of at most max(max_tokens, the longest text) tokens. Fewer, fuller rows than filling in order, so less
    trailing padding; the order of texts within rows does not matter, `pool_index` maps each back to its place."""
    capacity = max([max_tokens, *lengths])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


class PackedCollator:
    """Features (tokenized rows, no padding) -> a packed batch (see the module docstring)."""

    def __init__(self, max_tokens: int, pool: str, pad_token_id: int, position_offset: int,
                 position_limit: int | None, pad_to_multiple_of: int | None = None):
        self.max_tokens, self.pool, self.pad_id = max_tokens, pool, pad_token_id
        self.offset, self.limit, self.multiple = position_offset, position_limit, pad_to_multiple_of

    def _pool_column(self, ids: list[int]) -> int:
        if self.pool == "first":
            return 0
        real = [j for j, token in enumerate(ids) if token != self.pad_id]
        return real[-1] if real else 0  # as transformers: the rightmost token that is not pad

    def __call__(self, features: list[dict]) -> dict:
        texts = [f["input_ids"] for f in features]
        types_of = [f["token_type_ids"] for f in features] if "token_type_ids" in features[0] else None
        rows = pack_rows([len(t) for t in texts], self.max_tokens)
        width = max(sum(len(texts[i]) for i in row) for row in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        token_types = np.zeros((len(rows), width), dtype=np.int64) if types_of is not None else None
        pool_index = np.zeros(len(texts), dtype=np.int64)
        spans = np.zeros((len(texts), 2), dtype=np.int64)
        for r, members in enumerate(rows):
            column = 0
            for i in members:
                n = len(texts[i])
                ids[r, column:column + n] = texts[i]
                positions[r, column:column + n] = np.arange(n) + self.offset
                if token_types is not None:
                    token_types[r, column:column + n] = types_of[i]
                spans[i] = (r * width + column, n)
                pool_index[i] = r * width + column + self._pool_column(texts[i])
                column += n
            # Trailing padding restarts its positions (kept inside the position table, if the model has one), so
            # it is a sequence of its own and no text attends to it.
            trailing = np.arange(width - column)
            positions[r, column:] = (trailing if self.limit is None else trailing % self.limit) + self.offset
        batch = {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions),
                 "pool_index": torch.from_numpy(pool_index), "text_spans": torch.from_numpy(spans)}
        if token_types is not None:
            batch["token_type_ids"] = torch.from_numpy(token_types)
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch


def unpack(batch: dict) -> list[dict]:
    """A packed batch back into its features (to re-pack a slice of it: oom.EvalForward)."""
    flat_ids = batch["input_ids"].reshape(-1).tolist()
    flat_types = batch["token_type_ids"].reshape(-1).tolist() if "token_type_ids" in batch else None
    features = []
    for k, (start, n) in enumerate(batch["text_spans"].tolist()):
        feature = {"input_ids": flat_ids[start:start + n]}
        if flat_types is not None:
            feature["token_type_ids"] = flat_types[start:start + n]
        if "labels" in batch:
            feature["labels"] = batch["labels"][k].tolist()
        features.append(feature)
    return features


def is_packed(batch: dict) -> bool:
    return "pool_index" in batch


# --- the choice at build: supported, and proven the same on real batches -----------------------------

@dataclass
class Packing:
    """What trainer.packing resolved to: `collator` None when off; `reason` says why, for the plan line."""
    requested: str | bool
    collator: PackedCollator | None
    reason: str
    max_logit_difference: float | None = None

    @property
    def on(self) -> bool:
        return self.collator is not None

    def record(self) -> dict:
        """metrics.json's packing entry."""
        out = {"requested": self.requested, "on": self.on, "reason": self.reason}
        if self.on:
            out["max_tokens"] = self.collator.max_tokens
        if self.max_logit_difference is not None:
            out["max_logit_difference"] = self.max_logit_difference
        return out


def _logits(model, batch: dict) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def max_difference(model, padded_collate, packed_collate, features: list[dict], batch_size: int = 16) -> float:
    """The largest |packed - padded| logit over `features`, in eval mode (no dropout), relative to 1 + the
    largest |logit|. The model stays where it is (before prepare: every rank computes the same figure)."""
    was_training = model.training
    model.eval()
    worst = 0.0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(features), batch_size):
                chunk = features[i:i + batch_size]
                padded, packed = (
                    {k: v.to(device) for k, v in collate([dict(f) for f in chunk]).items()}
                    for collate in (padded_collate, packed_collate))
                a, b = _logits(model, padded).float(), _logits(model, packed).float()
                worst = max(worst, ((a - b).abs().max() / (1 + a.abs().max())).item())
    finally:
        model.train(was_training)
    return worst


def choose(requested, max_tokens: int, hf_model, model, tokenizer, padded_collate, features: list[dict],
           pad_to_multiple_of: int | None = None, texts: str = "training texts") -> Packing:
    """trainer.packing: false -> off; auto/true -> on where `hf_model` has the packed forward (`enable`: an
    architecture it knows) and packed logits equal padded ones on `features` (real `texts`) within
    CHECK_TOLERANCE. `model` is what runs (a peft model around `hf_model` under LoRA). On failure `hf_model` gets
    its class's forward back. A ConfigError for trainer.packing=true that cannot be honoured."""
    from .models import position_limit, position_offset

    head = getattr(hf_model, "_packing_head", None)
    if requested is False:
        return Packing(requested, None, "off (trainer.packing=false)")
    if head is None:
        reason = f"{type(hf_model).__name__} is not an architecture packing knows (BERT-like, RoBERTa-like, decoders)"
        return _off(requested, hf_model, reason)
    offset, limit = position_offset(hf_model), position_limit(hf_model)

    def collator(tokens: int) -> PackedCollator:
        return PackedCollator(tokens, head.pool, tokenizer.pad_token_id, offset, limit, pad_to_multiple_of)

    difference = max_difference(model, padded_collate, collator(CHECK_ROW_TOKENS), features)
    if not difference <= CHECK_TOLERANCE:  # NaN included
        reason = (f"packed logits differ from padded ones by {difference:.2g} (tolerance {CHECK_TOLERANCE:g}) on "
                  f"{len(features)} {texts}: this model or transformers version does not give packed rows a "
                  "block-diagonal attention")
        return _off(requested, hf_model, reason, difference)
    return Packing(requested, collator(max_tokens), f"on: rows of up to {max_tokens} tokens (or the batch's longest "
                   f"text), {head.kind}; packed = padded logits within {difference:.1g} on {len(features)} {texts}",
                   difference)


def _off(requested, hf_model, reason: str, difference: float | None = None) -> Packing:
    from .errors import ConfigError

    disable(hf_model)
    if requested is True:
        raise ConfigError(f"trainer.packing=true cannot be honoured: {reason}. Set trainer.packing=auto (packs "
                          "where it can) or false")
    return Packing(requested, None, f"off: {reason}", difference)


# --- prediction: transformers' text-classification pipeline, its batches packed ----------------------------

def packed_pipeline(model: str, device=None):
    """transformers' text-classification pipeline over a saved model folder (scripts/predict.py), computing
    packed batches where `choose` (the build check, on a few probe texts) allows; else the plain pipeline.
    Returns (pipeline, one line saying which). The pipeline pads each batch as usual; its forward step takes the
    real tokens back out and packs them (padding is cheap, computing it is not). The folder stays a plain
    transformers model folder."""
    from transformers import DataCollatorWithPadding, pipeline

    from .config import TrainerConfig  # rows as long as training's default (measured: docs/benchmarks.md)

    classify = pipeline("text-classification", model=model, device=device,
                        pipeline_class=_packed_pipeline_class())
    hf_model, tokenizer = classify.model, classify.tokenizer
    if tokenizer.pad_token_id is not None:
        enable(hf_model)
    probe = [dict(tokenizer(text, truncation=True)) for text in _PROBE_TEXTS]
    packing = choose("auto", TrainerConfig.packing_max_tokens, hf_model, hf_model, tokenizer,
                     DataCollatorWithPadding(tokenizer), probe, texts="probe texts")
    classify.packer = packing.collator
    if not packing.on:
        return classify, f"padded batches ({packing.reason})"
    return classify, (f"packed batches (packed = padded logits within {packing.max_logit_difference:.1g} on "
                      f"{len(probe)} probe texts)")


_PROBE_TEXTS = ["a", "an unexpectedly moving film , with a cast that never lets it down", "dull .",
                "two texts of different lengths make rows that end in padding", "fine", "not bad at all",
                "the plot wanders but the acting holds it together until the very last scene", "yes"]


def _packed_pipeline_class():
    """The text-classification pipeline with a packed forward step (`packer` None: the pipeline's own). Defined on
    first use: transformers.pipelines is a heavy import that training never needs."""
    from transformers import TextClassificationPipeline

    class PackedTextClassification(TextClassificationPipeline):
        packer: PackedCollator | None = None

        def _forward(self, model_inputs):
            if self.packer is None:
                return super()._forward(model_inputs)
            ids, mask = model_inputs["input_ids"], model_inputs["attention_mask"].bool()
            token_types = model_inputs.get("token_type_ids")
            features = []
            for row in range(ids.shape[0]):  # each row's real tokens, whichever side the pipeline padded
                feature = {"input_ids": ids[row][mask[row]].tolist()}
                if token_types is not None:
                    feature["token_type_ids"] = token_types[row][mask[row]].tolist()
                features.append(feature)
            batch = {k: v.to(ids.device) for k, v in self.packer(features).items()}
            return SequenceClassifierOutput(logits=self.model(**batch).logits)

    return PackedTextClassification
