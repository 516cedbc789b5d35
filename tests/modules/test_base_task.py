"""The base task is the whole contract: a new module of a few lines trains, evaluates and exports."""

import json
import sys
import textwrap

import pytest
import torch

from distill.cli import main
from distill.datamodules import ShapesWorldDataModule
from distill.modules import VisionLanguageTask

# A new training regime written against the base task alone: a linear image tower over a
# frozen random text tower (a tiny open_clip model), trained with labels on its class bank.
MINIMAL_MODULE = '''
import torch
import torch.nn.functional as F
from torchvision import transforms

from distill.clip_models import build_clip
from distill.modules import VisionLanguageTask


class LinearProbe(VisionLanguageTask):
    """Linear image tower trained against a frozen tiny open_clip text tower."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lambda params: torch.optim.SGD(params, lr=lr))
        self.clip = build_clip(model_name="{tiny}").model.requires_grad_(False)
        self.image_tower = torch.nn.Linear(3 * 16 * 16, self.clip.text_projection.shape[1])
        self.preprocess_train = self.preprocess_val = transforms.Compose([
            transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ])
        self.tokenizer = build_clip(model_name="{tiny}").tokenizer

    @property
    def has_text_tower(self) -> bool:
        return True

    @property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(20.0)

    def encode_image(self, images, normalize=True):
        out = self.image_tower(images.flatten(1))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens, normalize=True):
        return self.clip.encode_text(tokens, normalize=normalize)

    def training_step(self, batch, batch_idx):
        dm = self.trainer.datamodule
        logits = self.logit_scale * self.encode_image(batch["image"]) @ self.class_bank(dm.classnames, dm.templates).T
        loss = F.cross_entropy(logits, batch["label"])
        self.log("train/loss", loss)
        return loss
'''


@pytest.fixture
def minimal_module(tmp_path, monkeypatch):
    # "tiny-rn-test": the tests' tiny open_clip architecture, registered from distill/model_configs.
    (tmp_path / "minimal_task.py").write_text(textwrap.dedent(MINIMAL_MODULE).replace("{tiny}", "tiny-rn-test"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "minimal_task.LinearProbe"
    sys.modules.pop("minimal_task", None)


def test_a_module_from_the_base_task_alone_trains_evaluates_and_exports(minimal_module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = [
        "--data=ShapesWorldDataModule",
        "--data.init_args.train_domains=[flat]",
        "--data.init_args.ood_domains=[night]",
        "--data.init_args.image_size=16",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=32",
        "--data.init_args.num_test=32",
        "--data.init_args.batch_size=16",
    ]
    common = [f"--model={minimal_module}", *data, "--trainer.default_root_dir=run", "--trainer.accelerator=cpu"]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli = main(["fit", *common, *quiet, "--trainer.max_steps=8", "--trainer.callbacks+=ZeroShotEvaluation"])
    metrics = cli.trainer.callback_metrics
    assert {"val/id_top1", "val/ood_top1", "val/top1_flat", "val/top1_night", "val/i2t_r1"} <= set(metrics)
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    assert (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").is_file()  # logger derived from the run folder
    assert torch.load(ckpt, weights_only=True)["distill"]["module"] == "LinearProbe"

    main(["test", *common, *quiet, f"--ckpt_path={ckpt}", "--trainer.callbacks+=ZeroShotEvaluation"])
    report = json.loads(next((tmp_path / "run").rglob("zeroshot_test.json")).read_text())
    assert 0.0 <= report["metrics"]["id_top1"] <= 1.0 and "ood_top1" in report["metrics"]

    export = ["export", *common, f"--ckpt_path={ckpt}", "--output_dir=bundle", "--quantize=[]", "--bitsandbytes=[]"]
    main([*export, "--num_eval_images=16", "--latency_repeats=2"])
    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert bundle["text_model"] == "text_fp32.onnx" and bundle["logit_scale"] == pytest.approx(20.0)
    assert bundle["preprocess"]["crop"] == [16, 16] and bundle["preprocess"]["mean"] == [0.5] * 3


def test_shared_eval_steps_and_marker_are_written_once():
    class ImageOnly(VisionLanguageTask):
        def __init__(self) -> None:
            super().__init__()
            self.tower = torch.nn.Linear(4, 3)

        def encode_image(self, images, normalize=True):
            return torch.nn.functional.normalize(self.tower(images), dim=-1)

    module = ImageOnly()
    batch = {"image": torch.rand(2, 4), "text": torch.zeros(2, 5, dtype=torch.long)}
    out = module.validation_step(batch, 0)
    assert out["image_embeds"].shape == (2, 3) and out["text_embeds"] is None  # no text tower: text ignored
    assert module.predict_step(batch, 0)["image_embeds"].shape == (2, 3)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["distill"]["module"] == "ImageOnly"
    with pytest.raises(NotImplementedError, match="ImageOnly has no text tower and tokenizer"):
        module.class_bank(["a"], ["{}"])
    with pytest.raises(NotImplementedError, match="ImageOnly must define logit_scale"):
        _ = module.logit_scale


def test_a_datamodule_on_a_module_without_preprocess_val_names_it():
    class NoEvalTransform(VisionLanguageTask):
        def __init__(self) -> None:
            super().__init__()
            self.preprocess_train = lambda image: torch.zeros(3, 8, 8)

    dm = ShapesWorldDataModule(num_train=4, num_val=4, num_test=4, batch_size=2)
    with pytest.raises(ValueError, match=r"NoEvalTransform offers no preprocess_val: set self.preprocess_val"):
        dm.connect(NoEvalTransform())
    with pytest.raises(TypeError, match="feed a distill.modules.VisionLanguageTask; got Linear"):
        dm.connect(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="has no transforms yet: use it through a Trainer, or call connect"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="batch_size must be a positive number of samples, got 0"):
        ShapesWorldDataModule(batch_size=0)
