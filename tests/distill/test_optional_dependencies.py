"""Optional dependencies stay optional: without the export/wandb extras the CLI still trains and tests."""

import subprocess
import sys

# Run `distill` in a fresh interpreter where importing any optional package fails, as after a
# plain `pip install .` without extras.
LAUNCHER = """
import sys
for name in ("onnx", "onnxruntime", "onnxscript", "bitsandbytes", "wandb"):
    sys.modules[name] = None  # "import onnx" now raises ImportError
from distill.cli import console_main
sys.argv = ["distill", *sys.argv[1:]]
console_main()
"""
SMALL = [
    "--model=ContrastiveModule",
    "--model.init_args.model_name=tiny-rn-test",
    "--data=ShapesWorldDataModule",
    "--data.init_args.num_train=8",
    "--data.init_args.num_val=7",
    "--data.init_args.num_test=7",
    "--data.init_args.batch_size=4",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


def _distill(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_fit_and_test_run_without_the_optional_extras(tmp_path):
    assert _distill("--help", cwd=tmp_path).returncode == 0
    fit = _distill("fit", *SMALL, "--trainer.fast_dev_run=1", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    test = _distill("test", *SMALL, "--trainer.fast_dev_run=1", "--trainer.callbacks+=ZeroShotEvaluation", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    assert "test/id_top1" in test.stdout + test.stderr


def test_export_without_the_extra_names_it_in_one_line(tmp_path):
    export = _distill("export", *SMALL, "--output_dir=bundle", cwd=tmp_path)
    assert export.returncode == 2
    last = export.stderr.strip().splitlines()[-1]
    assert last.startswith("distill: error: distill export needs the export extra")
    assert "pip install 'distill[export]'" in last and "Traceback" not in export.stderr
