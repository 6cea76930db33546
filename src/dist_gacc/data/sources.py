"""A run's data: its source (an embedded corpus, data=csv files, a data=hub dataset) read, counted and split.

    load_splits ─┬─ the source's splits as columns     corpora.embedded_columns | tables.read_table /
                 │                                     datasets.load_dataset -> labels.checked_columns
                 ├─ per source: copies counted         splits.find_copies, one line each (drop_duplicates)
                 ├─ Datasets of label ids               columns.build
                 ├─ the split, groups whole            splits.grouped_split (no validation given)
                 └─ caps                               splits.capped
"""

from __future__ import annotations

import logging

import datasets
from datasets import Dataset, DatasetDict

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..logs import log_main
from . import splits as splitting
from .columns import LABEL, build, from_python, take
from .corpora import EMBEDDED, EMBEDDED_SCORES, EMBEDDED_SOURCES, embedded_columns
from .labels import checked_columns, label_names_of, resolve_problem_type
from .tables import read_table

_LOG = "dist_gacc.data"


def load_splits(cfg: DataConfig, seed: int) -> DatasetDict:
    """train/validation(/test) with `text`, [`text_pair`] and `label` columns, deterministic from the seed.
    Every row of the source is kept (data.drop_duplicates=true: but exact copies); each source's rows and
    repeated texts are counted in one line."""
    raw, names, where = _embedded(cfg) if cfg.name in EMBEDDED else _user_source(cfg)
    built = {}
    for split, columns in raw.items():
        copies = splitting.find_copies(columns)
        rows = None
        if cfg.drop_duplicates:
            rows = splitting.exact_copies(columns, copies)
            log_main(_LOG, f"data.drop_duplicates=true: dropped {copies.rows - len(rows)} exact copies (same text "
                           f"and label) of {copies.rows} rows from {where[split]}")
            copies = splitting.find_copies(take(columns, rows))
        line, warning = splitting.describe(copies, where[split], columns)
        log_main(_LOG, line)
        if warning:
            log_main(_LOG, warning, logging.WARNING)
        built[split] = (build(columns, names, cfg.multi_label, rows), copies)
    _warn_overlap(raw, where)
    if "validation" in built:
        out = DatasetDict({split: ds for split, (ds, _) in built.items()})
    else:
        pool, copies = built["train"]
        out = splitting.grouped_split(pool, copies.group, cfg.validation_fraction, cfg.test_fraction, seed,
                                      keep_test=built["test"][0] if "test" in built else None)
    caps = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_eval_samples}
    return splitting.capped(out, caps, seed)


def _embedded(cfg: DataConfig) -> tuple[dict, list[str], dict[str, str]]:
    regression = cfg.name in EMBEDDED_SCORES
    if cfg.problem_type not in ("auto", "regression" if regression else "classification"):
        raise ConfigError(f"data.problem_type={cfg.problem_type}: data={cfg.name} is a "
                          f"{'regression' if regression else 'classification'} task (use auto)")
    columns, names = embedded_columns(cfg.name)
    return ({"train": from_python(columns, regression=regression)}, names,
            {"train": f"data={cfg.name} ({EMBEDDED_SOURCES[cfg.name]})"})


def _user_source(cfg: DataConfig) -> tuple[dict, list[str], dict[str, str]]:
    """data=csv files or a data=hub dataset as {split: columns} (labels.checked_columns), the label names ([] for
    regression) and where each split was read from."""
    sources = _read_files(cfg) if cfg.name == "csv" else _read_hub(cfg)
    train = sources["train"][0]
    problem = resolve_problem_type(train, cfg)
    log_main(_LOG, problem.why)
    raw = {split: checked_columns(ds, where, cfg, problem) for split, (ds, where) in sources.items()}
    names = [] if problem.name == "regression" else label_names_of(raw, train, cfg)
    return raw, names, {split: where for split, (_, where) in sources.items()}


def _read_files(cfg: DataConfig) -> dict[str, tuple[Dataset, str]]:
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    as_text = (cfg.label_column,) if cfg.multi_label else ()
    return {split: (read_table(path, cfg.tsv_quoting, as_text), path) for split, path in files.items() if path}


def _read_hub(cfg: DataConfig) -> dict[str, tuple[Dataset, str]]:
    try:
        hub = datasets.load_dataset(cfg.hub_name, cfg.hub_config)
    except Exception as err:
        raise DataError(f"data.hub_name={cfg.hub_name!r}: cannot load from the Hub "
                        f"({type(err).__name__}: {err})") from err
    wanted = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}
    sources = {}
    for split, name in wanted.items():
        if name is None:
            continue
        if name not in hub:
            raise DataError(f"data.hub_name={cfg.hub_name!r} has no split {name!r} (splits: {list(hub)})")
        sources[split] = hub[name], f"{cfg.hub_name}[{name}]"
    return sources


def _warn_overlap(raw: dict[str, dict], where: dict[str, str]) -> None:
    """Given validation/test files that share texts with training: said, not changed (the user chose them)."""
    for split in ("validation", "test"):
        if split in raw:
            shared = splitting.overlap(raw["train"], raw[split])
            if shared:
                log_main(_LOG, f"{where[split]}: {shared} of its {len(raw[split][LABEL])} rows have a text that the "
                               f"training data ({where['train']}) also holds", logging.WARNING)
