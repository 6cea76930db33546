"""BatchNorm under accumulation: warn (and say why), refuse, or freeze the running statistics."""

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers.modeling_outputs import SequenceClassifierOutput

from dist_gacc.batchnorm import apply_batchnorm_policy
from dist_gacc.errors import ConfigError
from dist_gacc.loop import fit, standalone


class BatchNormClassifier(nn.Module):
    def __init__(self, vocab=30, dim=8, labels=2):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(vocab, dim), nn.BatchNorm1d(dim), nn.Linear(dim, labels)

    def forward(self, input_ids, **_):
        return SequenceClassifierOutput(logits=self.head(self.norm(self.embed(input_ids).mean(1))))


def _train(model, grad_accum_steps=2, micro=4, examples=32):
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum_steps, step_scheduler_with_optimizer=False)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 30, (5,), generator=gen), "labels": i % 2} for i in range(examples)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    fit(*standalone(accelerator, model, optimizer, scheduler,
                    lambda b: accelerator.prepare(DataLoader(rows, batch_size=b, shuffle=True)), examples, micro,
                    grad_accum_steps, total_updates=4, max_grad_norm=None))


def test_warn_explains_micro_batch_statistics():
    messages = []
    found = apply_batchnorm_policy(BatchNormClassifier(), "warn", 4, 2, 8, messages.append)
    assert found == ["norm"] and len(messages) == 1
    assert "mean and variance of that micro-batch (4 examples per process), not of the effective batch of 8" in messages[0]


def test_error_refuses_before_training():
    with pytest.raises(ConfigError, match=r"trainer.batchnorm=error: the model has BatchNorm layers \(norm\)"):
        apply_batchnorm_policy(BatchNormClassifier(), "error", 4, 2, 8, print)


def test_no_accumulation_no_message():
    messages = []
    apply_batchnorm_policy(BatchNormClassifier(), "error", 8, 1, 8, messages.append)
    assert messages == []


@pytest.mark.parametrize("policy", ["freeze", "warn"])
def test_freeze_keeps_running_statistics_fixed_while_weights_train(policy):
    torch.manual_seed(0)
    model = BatchNormClassifier()
    apply_batchnorm_policy(model, policy, 4, 2, 8, lambda msg: None)
    mean_before, weight_before = model.norm.running_mean.clone(), model.head.weight.detach().clone()
    _train(model)
    moved = (model.norm.running_mean - mean_before).abs().max().item()
    assert (model.head.weight - weight_before).abs().max().item() > 1e-3  # training happened
    if policy == "freeze":
        assert moved == 0.0 and model.norm.num_batches_tracked.item() == 0
    else:
        assert moved > 1e-4 and model.norm.num_batches_tracked.item() == 4 * 2  # per micro-batch: N per update


@pytest.mark.slow
def test_frozen_batchnorm_is_part_of_the_resume_fingerprint(tmp_path):
    """Frozen statistics change every forward pass: a resume that switches warn <-> freeze is refused where the
    model has BatchNorm layers. Elsewhere, and at the default, the key is absent (older checkpoints resume)."""
    import dataclasses

    from conftest import TINY, compose_cfg
    from dist_gacc.build import build, fingerprint
    from dist_gacc.checkpoint import CheckpointError, check_fingerprint

    job = build(compose_cfg(*TINY, "trainer.batchnorm=freeze", "trainer.log_with=none", f"output_dir={tmp_path}"))
    assert "batchnorm" not in fingerprint(job) and "group_by_length" not in fingerprint(job)  # BERT: no BatchNorm
    frozen = dataclasses.replace(job, model=BatchNormClassifier())
    warned = dataclasses.replace(frozen, rc=dataclasses.replace(
        job.rc, trainer=dataclasses.replace(job.rc.trainer, batchnorm="warn")))
    assert fingerprint(frozen)["batchnorm"] == "freeze" and "batchnorm" not in fingerprint(warned)
    with pytest.raises(CheckpointError, match=r"batchnorm: checkpoint None -> now 'freeze'"):
        check_fingerprint(fingerprint(warned), fingerprint(frozen), "step-4", force=False)
