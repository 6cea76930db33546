"""Tokenizer and model builders: any AutoModelForSequenceClassification (encoders, and decoders such as Llama,
Qwen2, Mistral, Gemma, GPT-2, which classify from their last real token), or a tiny BERT or Llama from scratch."""

from __future__ import annotations

import re
import warnings
from collections import Counter

from tokenizers import BertWordPieceTokenizer, Tokenizer, decoders, processors
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from .config import ModelConfig
from .errors import ConfigError
from .logs import log_main

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The from-scratch decoder's (model=tiny_decoder): unknown, begin and end of sequence, and no pad token, as Llama's
# own tokenizer ships; ensure_pad_token then gives it one by the transformers convention (eos as pad).
DECODER_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# Config attributes that hold dropout probabilities, across common encoder architectures.
DROPOUT_ATTRIBUTES = (
    "hidden_dropout_prob", "attention_probs_dropout_prob",  # BERT, RoBERTa, ELECTRA, MiniLM
    "dropout", "attention_dropout", "seq_classif_dropout",  # DistilBERT
    "hidden_dropout", "attention_probs_dropout",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",  # GPT-2 (Llama, Qwen2, Mistral, Gemma:
)                                                                        # attention_dropout, above)


def build_vocab(texts: list[str], vocab_size: int, specials: list[str] = SPECIAL_TOKENS) -> list[str]:
    """A WordPiece vocabulary from texts: frequent characters (and their ## forms), then frequent words.

    Written by hand because the `tokenizers` WordPiece trainer is not deterministic (two runs on the
    same 3,000 Chinese reviews gave 1,373 and 1,374 tokens with different ids); every rank and every
    run must build the identical vocabulary. CJK characters are split apart by BertNormalizer, so on
    Chinese text this is a character-level vocabulary.
    """
    normalizer = BertNormalizer(lowercase=True, handle_chinese_chars=True)
    pre_tokenizer = BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars: Counter[str] = Counter()
    for word, count in words.items():
        for ch in word:
            chars[ch] += count

    budget = max(vocab_size - len(specials), 2)
    by_count = lambda counter: sorted(counter, key=lambda key: (-counter[key], key))  # noqa: E731
    top_chars = by_count(chars)[: budget // 2]
    vocab = list(specials) + top_chars + ["##" + ch for ch in top_chars]
    multi_char_words = [w for w in by_count(words) if len(w) > 1 and words[w] > 1]
    vocab += multi_char_words[: max(vocab_size - len(vocab), 0)]
    return vocab


def build_tokenizer(cfg: ModelConfig, train_texts: list[str], max_length: int):
    """The run's tokenizer, its model_max_length data.max_length (as a from-scratch one has it): model/ saves it,
    so transformers' pipeline and scripts/predict.py (truncation=True) cut texts where training did, not at the
    pretrained tokenizer's own limit (512 for MiniLM). One without a pad token (most decoders') gets eos as pad."""
    if cfg.name_or_path is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, model_max_length=max_length)
        except OSError as err:
            raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: cannot load its tokenizer "
                              f"(a folder, or a Hub name with network access): {err}") from err
    elif is_decoder_scratch(cfg):
        vocab = build_vocab(train_texts, cfg.from_scratch["vocab_size"], DECODER_SPECIAL_TOKENS)
        tokenizer = decoder_tokenizer(vocab, max_length)
    else:
        vocab = build_vocab(train_texts, cfg.from_scratch["vocab_size"])
        wordpiece = BertWordPieceTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, lowercase=True)
        tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, model_max_length=max_length)
    note = ensure_pad_token(tokenizer, cfg.name_or_path or "model.from_scratch (tiny decoder)")
    if note:
        log_main(__name__, note)
    return tokenizer


def is_decoder_scratch(cfg: ModelConfig) -> bool:
    return cfg.name_or_path is None and cfg.from_scratch.get("architecture", "bert") == "llama"


def decoder_tokenizer(vocab: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """The from-scratch decoder's tokenizer: the same deterministic WordPiece vocabulary as the tiny BERT's, with
    Llama's framing (`<s>` before the text; a pair `<s> a </s> b`), no pad token, and no token_type_ids (Llama's
    forward takes none)."""
    backend = Tokenizer(WordPiece({tok: i for i, tok in enumerate(vocab)}, unk_token="<unk>"))
    backend.normalizer = BertNormalizer(lowercase=True, handle_chinese_chars=True)
    backend.pre_tokenizer = BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", vocab.index("<s>")), ("</s>", vocab.index("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=max_length, model_input_names=["input_ids", "attention_mask"])


def ensure_pad_token(tokenizer, source: str) -> str | None:
    """Give a tokenizer without a pad token one, by the transformers convention for decoders: eos as pad (no new
    token, so no embedding row to train). The collator pads with it, and the model's config gets its id
    (build_model): a decoder classifier pools the rightmost token that is not pad, whichever side the padding is
    on. Returns the line to log, or None if the tokenizer had one."""
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is None:
        raise ConfigError(f"model.name_or_path={source!r}: its tokenizer has neither a pad nor an eos token, so "
                          "batches cannot be padded; give the tokenizer a pad_token (saved in its folder)")
    tokenizer.pad_token = tokenizer.eos_token
    return (f"tokenizer of {source} has no pad token: padding with its eos token {tokenizer.eos_token!r} "
            f"(id {tokenizer.pad_token_id}; the transformers convention), saved with model/")


def build_model(cfg: ModelConfig, label_names: list[str], tokenizer,
                problem_type: str = "single_label_classification"):
    """A sequence classifier with `len(label_names)` outputs; label names and `problem_type` travel in its
    config, so transformers' pipeline applies a softmax (single-label) or a sigmoid per label (multi-label)."""
    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        problem_type=problem_type,
    )
    if cfg.name_or_path is None:
        return scratch_model(cfg, tokenizer, labels)
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, **labels)
    except OSError as err:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: cannot load its config: {err}") from err
    for name in DROPOUT_ATTRIBUTES:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, cfg.dropout)
    if getattr(config, "classifier_dropout", None) is not None:
        config.classifier_dropout = cfg.dropout
    set_pad_token_id(config, tokenizer)
    return AutoModelForSequenceClassification.from_pretrained(cfg.name_or_path, config=config)


def set_pad_token_id(config, tokenizer) -> None:
    """The config's pad_token_id is the tokenizer's: a decoder classifier pools the rightmost token whose id is
    not config.pad_token_id (transformers' GenericForSequenceClassification, GPT2ForSequenceClassification), and
    without one it refuses batches of more than one row. Set on the text config (multimodal configs nest it);
    saved with model/, so a pipeline over model/ pools the same token."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if tokenizer.pad_token_id is not None and getattr(text_config, "pad_token_id", None) != tokenizer.pad_token_id:
        text_config.pad_token_id = tokenizer.pad_token_id
        if text_config is not config:
            config.pad_token_id = tokenizer.pad_token_id


def scratch_model(cfg: ModelConfig, tokenizer, labels: dict):
    """model=tiny (a BERT) or model=tiny_decoder (a Llama: rotary positions, RMSNorm, SwiGLU, grouped-query
    attention when num_key_value_heads < num_attention_heads; the score head over the last real token)."""
    tiny = cfg.from_scratch
    sizes = dict(vocab_size=len(tokenizer), hidden_size=tiny["hidden_size"],
                 num_hidden_layers=tiny["num_hidden_layers"], num_attention_heads=tiny["num_attention_heads"],
                 intermediate_size=tiny["intermediate_size"], pad_token_id=tokenizer.pad_token_id, **labels)
    if is_decoder_scratch(cfg):
        config = LlamaConfig(
            **sizes, num_key_value_heads=tiny.get("num_key_value_heads") or tiny["num_attention_heads"],
            max_position_embeddings=max(512, tokenizer.model_max_length), attention_dropout=cfg.dropout,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
        return LlamaForSequenceClassification(config)
    config = BertConfig(
        **sizes, max_position_embeddings=max(512, tokenizer.model_max_length + 2),
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    return BertForSequenceClassification(config)


def _position_table(model):
    """The model's absolute-position Embedding (position_embeddings: BERT and kin; wpe: GPT-2), or None (relative or
    rotary positions, which do not index a table)."""
    import torch

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe") and isinstance(module, torch.nn.Embedding):
            return module
    return None


def position_offset(model) -> int:
    """The first position id: RoBERTa-style tables number positions from padding_idx + 1, others from 0."""
    table = _position_table(model)
    return table.padding_idx + 1 if table is not None and table.padding_idx is not None else 0


def position_limit(model) -> int | None:
    """The most tokens per row the model's absolute-position table holds (None: it has none). Read from the
    Embedding itself, not only config.max_position_embeddings: RoBERTa-style models number positions from
    padding_idx + 1, so 514 rows hold 512 tokens."""
    table = _position_table(model)
    return None if table is None else table.num_embeddings - position_offset(model)


def check_max_length(model, max_length: int) -> None:
    """Refuse data.max_length beyond the model's positions before training: otherwise the first text that long
    fails mid-run with an index error in the embedding lookup."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        configured = getattr(model.config, "max_position_embeddings", None)
        raise ConfigError(f"data.max_length={max_length} is longer than the model's {limit} positions "
                          f"(max_position_embeddings {configured}): set data.max_length={limit} or less")


# --- memory levers: gradient checkpointing, LoRA ----------------------------------------------------

# LoRA's default targets where peft has none: peft's own per-architecture defaults
# (peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, by config.model_type) come first, and this
# table only names the model types peft's mapping leaves out. Other architectures name theirs with
# peft.target_modules.
LORA_OWN_TARGETS = {
    # BERT-family encoders peft does not list: the attention query and value, as peft's bert/roberta entries.
    **dict.fromkeys(("camembert", "ernie", "megatron-bert", "data2vec-text", "xmod", "roc_bert"), ["query", "value"]),
    "distilbert": ["q_lin", "v_lin"],
    "qwen2_moe": ["q_proj", "v_proj"],  # as peft's qwen2: the attention is Qwen2's
    # Phi-3 fuses query, key and value into one Linear (no q_proj/v_proj exist): adapt the fused projection, as
    # peft does for GPT-2's c_attn and Falcon's query_key_value.
    "phi3": ["qkv_proj"],
}


def _import_peft():
    """peft, imported only where LoRA is asked for (tests replace this to simulate its absence)."""
    import peft

    return peft


def require_peft():
    """peft, or a ConfigError saying how to install it."""
    try:
        return _import_peft()
    except ImportError as err:
        raise ConfigError(f"peft.name=lora needs the peft package, which is not importable here ({err}): "
                          "pip install peft (pip install -e . installs it), or train with peft=none") from err


def is_peft_model(model) -> bool:
    """A peft PeftModel (checked by attribute, so peft need not be imported for plain models)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters. Under LoRA the total includes the adapters and peft's frozen copy
    of the original classification head (the trained head is a second, trainable copy)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_targets(model, peft_cfg) -> list[str] | str:
    """peft.target_modules, else the model type's default: peft's mapping, then LORA_OWN_TARGETS. A list names
    module-name suffixes; a string (some of peft's entries) is a regular expression over whole module names."""
    if peft_cfg.target_modules is not None:
        return list(peft_cfg.target_modules)
    default = default_lora_targets(getattr(model.config, "model_type", None))
    if default is None:
        model_type = getattr(model.config, "model_type", None)
        candidates = linear_module_names(model)
        raise ConfigError(f"peft=lora: neither peft nor dist-gacc has default LoRA target modules for model_type "
                          f"{model_type!r} ({type(model).__name__}); set peft.target_modules, e.g. "
                          f"peft.target_modules=[{','.join(candidates[:2])}] "
                          f"(linear modules here: {', '.join(candidates)})")
    return default[0]


def default_lora_targets(model_type: str | None) -> tuple[list[str] | str, str] | None:
    """(targets, where they come from) for a config.model_type, or None if neither peft nor dist-gacc has any."""
    peft_targets = require_peft().utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if model_type in peft_targets:
        targets = peft_targets[model_type]
        return (targets if isinstance(targets, str) else list(targets)), "peft's default"
    if model_type in LORA_OWN_TARGETS:
        return list(LORA_OWN_TARGETS[model_type]), "dist-gacc's default"
    return None


def is_lora_target(name: str, targets: list[str] | str) -> bool:
    """Whether peft adapts the module called `name`: a string is matched against the whole name (re.fullmatch),
    a list entry against the name or its last dotted parts, as peft matches target_modules."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_module_names(model) -> list[str]:
    """The distinct last parts of the names of the layers LoRA adapts here (Linear; transformers' Conv1D, as in
    GPT-2): what target_modules can name."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})


def check_lora_targets(model, peft_cfg, targets: list[str] | str) -> None:
    """Targets that match no module are a ConfigError naming peft.target_modules and the candidates; a default
    that matches nothing (a model type whose modules peft's mapping misnames) says where it came from."""
    if any(is_lora_target(name, targets) for name, _ in model.named_modules()):
        return
    candidates = ", ".join(linear_module_names(model))
    if peft_cfg.target_modules is not None:
        raise ConfigError(f"peft.target_modules={targets} matches no module of {type(model).__name__}; "
                          f"its linear modules are named {candidates}")
    model_type = getattr(model.config, "model_type", None)
    source = default_lora_targets(model_type)[1]
    raise ConfigError(f"peft.target_modules=null: {source} LoRA targets for model_type {model_type!r}, "
                      f"{targets}, match no module of {type(model).__name__}; set peft.target_modules to some "
                      f"of its linear modules: {candidates}")


def apply_lora(model, peft_cfg):
    """Wrap `model` in a peft PeftModel with LoRA adapters; only the adapters and the head train.

    TaskType.SEQ_CLS makes peft keep the classification head (`classifier` / `score`) fully trainable
    (modules_to_save: a trainable copy beside a frozen original). Target names that match nothing are a
    ConfigError naming peft.target_modules and the names that exist."""
    peft = require_peft()
    targets = lora_targets(model, peft_cfg)
    check_lora_targets(model, peft_cfg, targets)
    # GPT-2's Conv1D stores its weight transposed: peft would switch fan_in_fan_out on itself, with a warning.
    transposed = any(type(module).__name__ == "Conv1D" for name, module in model.named_modules()
                     if is_lora_target(name, targets))
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=peft_cfg.r, lora_alpha=peft_cfg.alpha,
                             lora_dropout=peft_cfg.dropout, target_modules=targets, fan_in_fan_out=transposed)
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as err:  # e.g. a target that exists but is no layer type LoRA can adapt
        raise ConfigError(f"peft.target_modules={targets}: peft refused them: {err} (linear modules of "
                          f"{type(model).__name__}: {', '.join(linear_module_names(model))})") from err


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing (torch.utils.checkpoint with
    use_reentrant=False) is plain autograd, so it is safe under DDP and inside no_sync: the reentrant
    variant recomputes inside a nested backward that DDP's reducer does not follow (errors such as "Expected
    to mark a variable ready only once" with unused parameters or a static graph). It also needs no input
    that requires grad: a reentrant segment whose inputs do not (frozen embeddings under LoRA) gives its
    parameters no gradient unless enable_input_require_grads is called. The recomputation restores the RNG
    state, so dropout masks repeat: the math is unchanged.
    `model` is the transformers model (under LoRA, the PeftModel's base model)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support "
                          "gradient checkpointing (supports_gradient_checkpointing is False); set "
                          "model.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_memory_levers(model, model_cfg: ModelConfig, peft_cfg):
    """LoRA (peft.name=lora), then gradient checkpointing on the transformers model underneath; both before
    accelerator.prepare. Returns the model to train (a PeftModel under LoRA).

    Order: LoRA first, so peft does not install its input-requires-grad hook for checkpointing (it does when
    the model it wraps already checkpoints); transformers installs one when checkpointing is enabled on a
    model fed input_ids. With non-reentrant checkpointing that hook is not needed, and it changes no
    gradient of a trainable parameter."""
    if peft_cfg.name == "lora":
        model = apply_lora(model, peft_cfg)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model.get_base_model() if is_peft_model(model) else model)
    return model


def merged_copy(peft_model):
    """A plain transformers model with the adapters merged into the weights, from a deep copy: the trained
    PeftModel is untouched (merging in place and unmerging afterwards would round the base weights)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def whole_peft_copy(peft_model, state_dict: dict):
    """An unsharded CPU PeftModel like `peft_model` (same base config, same LoRA config) holding `state_dict` (its
    full state dict, e.g. gathered from FSDP shards): what merged_copy and save_pretrained need on one process.
    Loaded strictly, so a key the gathered dict lacks (or adds) fails here rather than in a half-written model/."""
    peft = require_peft()
    base = AutoModelForSequenceClassification.from_config(peft_model.get_base_model().config)
    copy = peft.get_peft_model(base, peft_model.peft_config[peft_model.active_adapter])
    copy.load_state_dict(state_dict)
    return copy
