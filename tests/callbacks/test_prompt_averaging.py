"""Gaussian prompt averaging: the final parameters are the hand-computed weighted mean of the snapshots."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distill.callbacks import GaussianPromptAveraging
from distill.callbacks.prompt_averaging import gaussian_weights

TRAINABLE = ("ctx", "proj.weight")


class TinyPrompted(pl.LightningModule):
    """Two trainable tensors, one frozen parameter and a buffer; SGD with momentum."""

    def __init__(self, trainable: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ctx = torch.nn.Parameter(torch.randn(3))
        self.proj = torch.nn.Linear(2, 2, bias=False)
        self.frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("bank", torch.randn(2))
        if not trainable:
            self.ctx.requires_grad_(False)
            self.proj.requires_grad_(False)
        self.val_seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return ((self.ctx - 1) ** 2).sum() + (self.proj(x) - self.bank).pow(2).mean() + 0 * self.frozen.sum()

    def validation_step(self, batch, batch_idx):
        self.val_seen.append(_trainable(self))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.05, momentum=0.9) if params else None


class Recorder(pl.Callback):
    """Trainable parameters after each optimizer step (listed before the averaging callback)."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at[trainer.global_step] = _trainable(pl_module)


class StopAt(pl.Callback):
    """At a step: optionally save a checkpoint, then stop gracefully or raise."""

    def __init__(self, step: int, ckpt=None, crash: bool = False) -> None:
        self.step, self.ckpt, self.crash = step, ckpt, crash

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.ckpt is not None:
            trainer.save_checkpoint(self.ckpt)
        if self.crash:
            raise RuntimeError("crash")
        trainer.should_stop = True


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _loader(batches: int = 4, same_rows: bool = False):
    torch.manual_seed(1)
    x = torch.randn(1, 2).expand(batches * 2, 2) if same_rows else torch.randn(batches * 2, 2)
    return DataLoader(TensorDataset(x.clone()), batch_size=2)


def _trainer(callbacks, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _pdf(x, mu, sigma):
    return math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def _expected(snapshots, steps, mean, std, n):
    """sum_t w_t theta(step_t) / sum_t w_t with w_t = pdf(t / n; mean, std), t = 1.. len(steps)."""
    w = [_pdf(t / n, mean, std) for t in range(1, len(steps) + 1)]
    return {name: sum(wt * snapshots[s][name].double() for wt, s in zip(w, steps)) / sum(w) for name in TRAINABLE}


def _assert_params(module, expected):
    got = _trainable(module)
    assert set(got) == set(TRAINABLE)
    for name in TRAINABLE:
        torch.testing.assert_close(got[name].double(), expected[name], rtol=0, atol=1e-6)


def test_weights_match_published_epoch_weights():
    """PromptSRC: 20 epochs, pdf(epoch; 15, 1) for epochs 1..20, normalised."""
    published = [_pdf(e, 15, 1) for e in range(1, 21)]
    total = sum(published)
    got = gaussian_weights(20, 0.75, 0.05)
    assert got == pytest.approx([p / total for p in published], rel=1e-12, abs=1e-300)
    assert math.fsum(got) == pytest.approx(1.0)
    assert max(range(20), key=got.__getitem__) == 14  # epoch 15
    assert math.fsum(gaussian_weights(3, 0.5, 1e-4)) == pytest.approx(1.0)  # narrow: no 0/0


def test_step_points_give_the_weighted_mean_and_leave_frozen_untouched():
    module, rec = TinyPrompted(), Recorder()
    frozen, bank = module.frozen.detach().clone(), module.bank.clone()
    gpa = GaussianPromptAveraging(num_points=4, mean=0.6, std=0.25)
    _trainer([rec, gpa], max_steps=10).fit(module, _loader())
    steps = [3, 5, 8, 10]  # ceil(t * 10 / 4)
    _assert_params(module, _expected(rec.at, steps, 0.6, 0.25, 4))
    assert not torch.allclose(_trainable(module)["ctx"], rec.at[10]["ctx"])  # it did change something
    assert torch.equal(module.frozen, frozen) and torch.equal(module.bank, bank)


def test_epoch_points_with_accumulation_and_final_validation_sees_the_average():
    module, rec = TinyPrompted(), Recorder()
    gpa = GaussianPromptAveraging(mean=0.5, std=0.3)  # one point per epoch
    trainer = _trainer([rec, gpa], max_epochs=3, accumulate_grad_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, _loader(4), _loader(1))
    assert trainer.global_step == 6
    expected = _expected(rec.at, [2, 4, 6], 0.5, 0.3, 3)  # epoch ends: 2 optimizer steps per epoch
    _assert_params(module, expected)
    assert len(module.val_seen) == 3
    for name in TRAINABLE:  # the last epoch's validation already ran on the averaged prompts
        torch.testing.assert_close(module.val_seen[-1][name].double(), expected[name], rtol=0, atol=1e-6)


def test_early_stop_renormalises_points_reached():
    module, rec = TinyPrompted(), Recorder()
    gpa = GaussianPromptAveraging(num_points=4, mean=0.6, std=0.25)
    with pytest.warns(UserWarning, match="after 2 of 4 points"):
        _trainer([rec, gpa, StopAt(6)], max_steps=10).fit(module, _loader())
    _assert_params(module, _expected(rec.at, [3, 5], 0.6, 0.25, 4))


def test_resumed_run_averages_the_same(tmp_path):
    # Identical batches: a mid-epoch resume restarts the (non-resumable) loader, which must not matter here.
    loader = _loader(same_rows=True)
    full = TinyPrompted()
    _trainer([GaussianPromptAveraging(num_points=4, mean=0.6, std=0.25)], max_steps=10).fit(full, loader)

    ckpt = tmp_path / "mid.ckpt"
    first = GaussianPromptAveraging(num_points=4, mean=0.6, std=0.25)
    with pytest.raises(RuntimeError, match="crash"):  # after points 3 and 5, before 8 and 10
        _trainer([first, StopAt(6, ckpt, crash=True)], max_steps=10).fit(TinyPrompted(), loader)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if "GaussianPromptAveraging" in k]
    assert state["taken"] == 2

    resumed = TinyPrompted()
    gpa = GaussianPromptAveraging(num_points=4, mean=0.6, std=0.25)
    _trainer([gpa], max_steps=10).fit(resumed, loader, ckpt_path=ckpt)
    expected = {n: p.double() for n, p in _trainable(full).items()}
    _assert_params(resumed, expected)


def test_state_dict_round_trip():
    gpa = GaussianPromptAveraging(num_points=4, mean=0.6, std=0.25)
    _trainer([gpa, StopAt(6)], max_steps=10).fit(TinyPrompted(), _loader())
    state = gpa.state_dict()
    other = GaussianPromptAveraging(num_points=4, mean=0.6, std=0.25)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again.keys() == state.keys()
    for key in state:
        if key == "sums":
            assert again[key].keys() == state[key].keys()
            assert all(torch.equal(again[key][n], state[key][n]) for n in state[key])
        else:
            assert again[key] == state[key], key


def test_resume_with_other_settings_is_an_error(tmp_path):
    ckpt = tmp_path / "mid.ckpt"
    with pytest.raises(RuntimeError, match="crash"):
        _trainer([GaussianPromptAveraging(num_points=4), StopAt(3, ckpt, crash=True)], max_steps=10).fit(
            TinyPrompted(), _loader()
        )
    with pytest.raises(ValueError, match="num_points, mean, std"):
        _trainer([GaussianPromptAveraging(num_points=4, mean=0.5)], max_steps=10).fit(
            TinyPrompted(), _loader(), ckpt_path=ckpt
        )


def test_clear_errors():
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        _trainer([GaussianPromptAveraging(num_points=2)], max_steps=4).fit(TinyPrompted(trainable=False), _loader())
    with pytest.warns(UserWarning, match="exceeds the run's 4 optimizer steps; using 4"):
        _trainer([GaussianPromptAveraging(num_points=5)], max_steps=4).fit(TinyPrompted(), _loader())
    with pytest.raises(ValueError, match="max_epochs is not set"):
        _trainer([GaussianPromptAveraging()], max_steps=4).fit(TinyPrompted(), _loader())
    for bad in ({"num_points": 0}, {"mean": 0.0}, {"mean": 1.5}, {"std": 0.0}):
        with pytest.raises(ValueError):
            GaussianPromptAveraging(**bad)
