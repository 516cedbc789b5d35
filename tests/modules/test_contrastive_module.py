import math

import pytest
import torch

from distill.datamodules import ShapesWorldDataModule
from distill.modules import ContrastiveModule
from distill.objectives import DCL, InfoNCE, SigLIP, SoftTargetContrastive


def _batch(module, n=16):
    dm = ShapesWorldDataModule(num_train=n, num_val=7, num_test=7, batch_size=n, train_domains=["flat"])
    dm.connect(module)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(
    "objectives, extra",
    [
        ([InfoNCE()], {}),
        ([SigLIP()], {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}),
        ([InfoNCE(weight=0.5), DCL(weight=0.5)], {}),
        ([SoftTargetContrastive(target_temperature=0.02)], {}),
    ],
)
def test_overfits_a_fixed_batch(tiny_config, objectives, extra):
    torch.manual_seed(0)
    module = ContrastiveModule(model_config=tiny_config, objectives=objectives, **extra)
    batch = _batch(module)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = __import__("distill.objectives", fromlist=["weighted_sum"]).weighted_sum(
            module.objectives, module(batch["image"], batch["text"])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_siglip_without_bias_is_refused(tiny_config):
    with pytest.raises(ValueError, match="init_logit_bias"):
        ContrastiveModule(model_config=tiny_config, objectives=[SigLIP()])


def test_logit_scale_is_clamped_after_each_step(tiny_config):
    module = ContrastiveModule(model_config=tiny_config, max_logit_scale=50.0)
    with torch.no_grad():
        module.model.logit_scale.fill_(10.0)
    module.on_train_batch_end(None, None, 0)
    assert module.model.logit_scale.exp().item() == pytest.approx(50.0)


def test_no_weight_decay_on_gains_biases_and_temperature(tiny_config):
    module = ContrastiveModule(
        model_config=tiny_config, optimizer=lambda groups: torch.optim.AdamW(groups, weight_decay=0.2)
    )
    optimizer = module.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert any(p is module.model.logit_scale for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    total = sum(p.numel() for p in module.model.parameters())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == total


def test_batch_without_tokens_is_a_clear_error(tiny_config):
    module = ContrastiveModule(model_config=tiny_config)
    with pytest.raises(KeyError, match="no 'text' tokens"):
        module.training_step({"image": torch.zeros(2, 3, 32, 32)}, 0)
