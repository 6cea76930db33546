"""Tokenizer and model builders: any AutoModelForSequenceClassification, or a tiny BERT from scratch."""

from __future__ import annotations

from collections import Counter

from tokenizers import BertWordPieceTokenizer
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
)

from .config import ModelConfig
from .errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Config attributes that hold dropout probabilities, across common encoder architectures.
DROPOUT_ATTRIBUTES = (
    "hidden_dropout_prob", "attention_probs_dropout_prob",  # BERT, RoBERTa, ELECTRA, MiniLM
    "dropout", "attention_dropout", "seq_classif_dropout",  # DistilBERT
    "hidden_dropout", "attention_probs_dropout",
)


def build_vocab(texts: list[str], vocab_size: int) -> list[str]:
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

    budget = max(vocab_size - len(SPECIAL_TOKENS), 2)
    by_count = lambda counter: sorted(counter, key=lambda key: (-counter[key], key))  # noqa: E731
    top_chars = by_count(chars)[: budget // 2]
    vocab = SPECIAL_TOKENS + top_chars + ["##" + ch for ch in top_chars]
    multi_char_words = [w for w in by_count(words) if len(w) > 1 and words[w] > 1]
    vocab += multi_char_words[: max(vocab_size - len(vocab), 0)]
    return vocab


def build_tokenizer(cfg: ModelConfig, train_texts: list[str], max_length: int):
    if cfg.name_or_path is not None:
        try:
            return AutoTokenizer.from_pretrained(cfg.name_or_path)
        except OSError as err:
            raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: cannot load its tokenizer "
                              f"(a folder, or a Hub name with network access): {err}") from err
    vocab = build_vocab(train_texts, cfg.from_scratch["vocab_size"])
    wordpiece = BertWordPieceTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, lowercase=True)
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, model_max_length=max_length)


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
        tiny = cfg.from_scratch
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny["hidden_size"],
            num_hidden_layers=tiny["num_hidden_layers"],
            num_attention_heads=tiny["num_attention_heads"],
            intermediate_size=tiny["intermediate_size"],
            max_position_embeddings=max(512, tokenizer.model_max_length + 2),
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            pad_token_id=tokenizer.pad_token_id,
            **labels,
        )
        return BertForSequenceClassification(config)

    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, **labels)
    except OSError as err:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: cannot load its config: {err}") from err
    for name in DROPOUT_ATTRIBUTES:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, cfg.dropout)
    if getattr(config, "classifier_dropout", None) is not None:
        config.classifier_dropout = cfg.dropout
    return AutoModelForSequenceClassification.from_pretrained(cfg.name_or_path, config=config)
