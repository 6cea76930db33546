"""Config composition (Hydra, struct mode) and value validation before any work."""

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import compose_cfg, launch
from dist_gacc.config import TrainerConfig, check_machine, load_config
from dist_gacc.errors import ConfigError


def test_defaults_compose_to_the_documented_keys():
    cfg = compose_cfg("output_dir=/tmp/x")
    rc = load_config(cfg)
    assert (cfg.data.name, rc.model.name_or_path is not None) == ("rotten_tomatoes", True)
    assert (rc.trainer.micro_batch_size, rc.trainer.grad_accum_steps, rc.trainer.mixed_precision) == (32, 1, "auto")
    assert rc.optim.scheduler == "linear" and rc.optim.lr == pytest.approx(5e-5)
    for key in ("max_steps", "max_grad_norm", "eval_every", "epochs"):
        assert key in cfg.trainer
    for key in ("lr", "weight_decay", "scheduler", "warmup_ratio"):
        assert key in cfg.optim


def test_groups_and_overlays_switch():
    cfg = compose_cfg("data=chinese_reviews", "model=tiny", "debug=default", "output_dir=/tmp/x")
    assert cfg.data.name == "chinese_reviews" and cfg.model.name_or_path is None
    assert cfg.trainer.max_steps == 8  # from the debug overlay
    cfg = compose_cfg("experiment=chinese_tiny", "output_dir=/tmp/x")
    assert cfg.data.name == "chinese_reviews" and cfg.model.from_scratch.vocab_size > 0


def test_mistyped_key_fails_in_struct_mode():
    with pytest.raises(ConfigCompositionException, match="micro_batchsize"):
        compose_cfg("trainer.micro_batchsize=4")


@pytest.mark.parametrize("override, message", [
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps must be an integer >= 1, got 0"),
    ("trainer.micro_batch_size=abc", "trainer.micro_batch_size must be an integer >= 1, got 'abc'"),
    ("trainer.micro_batch_size=2.5", "trainer.micro_batch_size must be an integer >= 1, got 2.5"),
    ("optim.lr=0", "optim.lr must be a number > 0.0, got 0"),
    ("optim.lr=-1e-5", "optim.lr must be a number > 0.0, got -1e-05"),
    ("trainer.mixed_precision=fp32", "trainer.mixed_precision must be one of auto|no|bf16|fp16, got 'fp32'"),
    ("optim.scheduler=step", "optim.scheduler must be one of linear|cosine|constant, got 'step'"),
    ("trainer.max_steps=0", "trainer.max_steps must be an integer >= 1 or null, got 0"),
    ("data.name=imdb", "data.name must be one of rotten_tomatoes|chinese_reviews|debates|csv|hub|review_pairs|word_pleasantness, got 'imdb'"),
    ("trainer.effective_batch_size=0", "trainer.effective_batch_size must be an integer >= 1 or null, got 0"),
    ("trainer.batchnorm=ignore", "trainer.batchnorm must be one of warn|error|freeze, got 'ignore'"),
])
def test_bad_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(compose_cfg(override, "output_dir=/tmp/x"))
    assert message in str(err.value)


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(ConfigError, match=f"data.train_file: file not found: {missing}"):
        load_config(compose_cfg("data=csv", f"data.train_file={missing}", "output_dir=/tmp/x"))
    with pytest.raises(ConfigError, match="data.train_file is required"):
        load_config(compose_cfg("data=csv", "output_dir=/tmp/x"))


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path: folder not found"):
        load_config(compose_cfg(f"model.name_or_path={tmp_path}/absent", "output_dir=/tmp/x"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where CUDA exists")
def test_fp16_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        check_machine(TrainerConfig(mixed_precision="fp16"))
    check_machine(TrainerConfig(mixed_precision="bf16"))  # bf16 runs on CPU


def test_cli_exits_nonzero_naming_the_key_before_any_work(tmp_run):
    proc = launch(tmp_run, "trainer.grad_accum_steps=0", check=False)
    assert proc.returncode == 2
    assert "error: trainer.grad_accum_steps must be an integer >= 1, got 0" in proc.stderr
    assert not (tmp_run / "metrics.json").exists() and not (tmp_run / "model").exists()


def test_cli_refuses_fp16_on_cpu(tmp_run):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    proc = launch(tmp_run, "model=tiny", "trainer.mixed_precision=fp16", check=False)
    assert proc.returncode == 2 and "fp16 needs a CUDA GPU" in proc.stderr


@pytest.mark.parametrize("task, setting, lr, micro, n, train_cap", [
    ("english_minilm", "b20_lr2e-5", 2e-5, 20, 1, 2400),
    ("english_minilm", "b10x6_lr6e-5", 6e-5, 10, 6, 2400),
    ("chinese_tiny", "b10x2_lr2e-5", 5e-4, 10, 2, 4000),
    ("chinese_tiny", "b10x6_lr5e-5", 1.25e-3, 10, 6, 4000),
])
def test_seed_table_cpu_grid_composes(task, setting, lr, micro, n, train_cap):
    cfg = compose_cfg("experiment=seed_table_cpu", f"+task={task}", f"+setting={setting}", "output_dir=/tmp/x")
    assert cfg.trainer.mixed_precision == "auto"  # fp32 on CPUs without native bf16
    rc = load_config(cfg)
    assert rc.optim.lr == pytest.approx(lr)
    assert (rc.trainer.micro_batch_size, rc.trainer.grad_accum_steps) == (micro, n)
    assert rc.data.max_train_samples == train_cap and rc.trainer.early_stopping_patience == 2
    assert rc.model.name_or_path is None if task == "chinese_tiny" else rc.model.name_or_path


def test_seed_table_cpu_sweeps_three_seeds():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        params = compose(config_name="train", overrides=["experiment=seed_table_cpu"],
                         return_hydra_config=True).hydra.sweeper.params
        single = compose(config_name="train", overrides=["experiment=seed_table"],
                         return_hydra_config=True).hydra.sweeper.params
    # 2 tasks x 4 settings x 3 seeds = 24 jobs; seed is a root key of train.yaml (no `+`)
    assert params["seed"] == "42,43,44"
    assert [len(params[k].split(",")) for k in ("+task", "+setting", "seed")] == [2, 4, 3]
    assert "seed" not in single  # the GPU grid stays one seed


def test_train_log_keeps_our_lines_and_only_warnings_of_other_libraries(tmp_path):
    """Hydra's job_logging as composed: a fresh machine's matplotlib logs its font cache build at INFO,
    which must not reach train.log (it made two runs' logs differ); its warnings, and ours at INFO, do."""
    import logging
    import logging.config

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=["output_dir=/tmp/x"])
    logging_cfg = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    logging_cfg["handlers"]["file"]["filename"] = str(tmp_path / "train.log")
    saved = logging.root.handlers[:], logging.root.level
    try:
        logging.config.dictConfig(logging_cfg)
        logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
        logging.getLogger("matplotlib.font_manager").warning("a foreign warning")
        logging.getLogger("dist_gacc.build").info("world size 1")
        for handler in logging.root.handlers:
            handler.flush()
    finally:
        logging.root.handlers, logging.root.level = saved
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split("] - ")[-1] for line in lines] == ["a foreign warning", "world size 1"]


def _small_position_model(kind: str, positions: int):
    """A tiny BERT or RoBERTa classifier with `positions` position embeddings."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    sizes = {"vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": positions}
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**sizes, pad_token_id=1))
    return BertForSequenceClassification(BertConfig(**sizes))


def test_max_length_beyond_the_models_positions_is_refused():
    """The model's absolute-position table bounds the tokens per row: a longer data.max_length crashed at the
    first long text, mid-training. RoBERTa's positions start after its padding id (514 -> 512 tokens)."""
    from dist_gacc.models import check_max_length, position_limit

    bert, roberta = _small_position_model("bert", 16), _small_position_model("roberta", 18)
    assert (position_limit(bert), position_limit(roberta)) == (16, 16)
    with pytest.raises(ConfigError) as err:
        check_max_length(bert, 17)
    assert "data.max_length=17 is longer than the model's 16 positions (max_position_embeddings 16)" in str(err.value)
    with pytest.raises(ConfigError, match="data.max_length=17 is longer than the model's 16 positions"):
        check_max_length(roberta, 17)
    check_max_length(bert, 16)
    check_max_length(roberta, 16)
    for positions in (512, 514):  # BERT/MiniLM 512; RoBERTa's 514 hold 512 tokens
        kind = "bert" if positions == 512 else "roberta"
        assert position_limit(_small_position_model(kind, positions)) == 512


@pytest.mark.slow
def test_cli_refuses_a_max_length_beyond_the_models_positions_before_training(tmp_path):
    """A saved BERT with 16 positions and data.max_length=64: Rotten Tomatoes snippets run past 16 tokens, so
    training crashed on an index error (a traceback) at the first long one. Now exit 2 before any update."""
    from conftest import TINY
    from dist_gacc.config import ModelConfig
    from dist_gacc.models import build_tokenizer

    folder = tmp_path / "short-bert"
    model = _small_position_model("bert", 16)
    tokenizer = build_tokenizer(ModelConfig(name_or_path=None, from_scratch={
        "vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32}), ["a fine film with a dull plot"], 16)
    model.config.vocab_size = len(tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = tmp_path / "run"
    proc = launch(run, *TINY, f"model.name_or_path={folder}", "data.max_length=64", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: data.max_length=64 is longer than the model's 16 positions" in proc.stderr
    assert "updates:" not in proc.stderr and not (run / "metrics.json").exists()
