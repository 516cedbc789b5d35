"""Shared fixtures: the tiny open_clip model config and a random tiny teacher folder."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Tests are CPU-only and must not reach any hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Configs with the W&B overlay build a WandbLogger that writes nothing; tests that check W&B set their own mode.
os.environ["WANDB_MODE"] = "disabled"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The tests' architecture, an open_clip model config shipped in distill/model_configs and
# registered on import of distill.clip_models: ModifiedResNet of width 8 at 32 px, 1-layer text.
TINY_MODEL = "tiny-rn-test"  # its ViT-shaped sibling, tiny-vit-test, backs tests/distill/conftest.py


@pytest.fixture
def tiny_config() -> dict:
    """A copy of the tiny model's open_clip config (for tests that pass or edit a config dict)."""
    import open_clip

    import distill.clip_models  # noqa: F401  (registers the model configs)

    return open_clip.get_model_config(TINY_MODEL)


@pytest.fixture
def tiny_local_dir(tmp_path):
    """A random tiny open_clip model saved as a ``local-dir`` folder."""
    from distill.clip_models import build_clip, save_local_dir

    torch.manual_seed(0)
    bundle = build_clip(model_name=TINY_MODEL)
    return save_local_dir(bundle.model, bundle.model_config, bundle.preprocess_config, tmp_path / "tiny_teacher")


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder: nothing a test writes (configs, logs) lands in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _cli_args_only(monkeypatch):
    """``main(args)`` is the whole command line: pytest's own arguments are not in ``sys.argv`` (else
    LightningCLI warns on stderr, which the one-line error tests read when ``-p no:warnings`` is given)."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def _html_problems(path) -> list[str]:
    """What is wrong with a report page: unbalanced tags, images that do not open, links to missing files,
    tables without rows. Empty when the page is sound."""
    import base64
    import io
    from html.parser import HTMLParser
    from pathlib import Path

    from PIL import Image

    void = {"meta", "img", "br", "hr", "link", "input"}
    problems: list[str] = []
    path = Path(path)

    class Checker(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []
            self.table_rows: list[int] = []
            self.images = 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images += 1
                src = attrs.get("src") or ""
                try:
                    if src.startswith("data:image/png;base64,"):
                        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()
                    else:
                        Image.open(path.parent / src).load()
                except Exception as err:  # any failure to open is the finding
                    problems.append(f"image {src[:40]}... does not open: {err}")
                if not attrs.get("alt"):
                    problems.append("image without alt text")
            href = attrs.get("href") if tag == "a" else None
            if href and not href.startswith(("http", "#")) and not (path.parent / href).exists():
                problems.append(f"link to a missing file {href}")
            if tag == "table":
                self.table_rows.append(0)
            if tag == "tr" and self.stack and "tbody" in self.stack:
                self.table_rows[-1] += 1
            if tag not in void:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            if tag in void:
                return
            if not self.stack or self.stack[-1] != tag:
                problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
                return
            self.stack.pop()

    text = path.read_text(encoding="utf-8")
    if not text.startswith("<!DOCTYPE html>"):
        problems.append("no <!DOCTYPE html>")
    checker = Checker()
    checker.feed(text)
    checker.close()
    if checker.stack:
        problems.append(f"unclosed tags {checker.stack}")
    problems += [f"table {i} has no rows" for i, rows in enumerate(checker.table_rows) if rows == 0]
    return problems


@pytest.fixture
def html_problems():
    """``html_problems(path) -> list[str]``: what is wrong with an HTML report (empty when sound)."""
    return _html_problems
