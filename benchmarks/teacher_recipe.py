"""Accuracy-versus-time trials for the ShapesWorld teacher recipe (plain PyTorch loop).

Trains one open_clip model contrastively on ShapesWorld for a wall-clock budget and prints the
zero-shot top-1 per domain at fixed intervals; saves the curve as JSON. Used to pick the demo
teacher's architecture and schedule (see the README's "Teacher recipe" section).

    python benchmarks/teacher_recipe.py --arch rn --minutes 8 --out benchmarks/results/x.json
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from jsonargparse import CLI

from distill.shapesworld import DOMAINS, ZERO_SHOT_TEMPLATES, class_names, render

ARCHS = {
    "rn": {"image": {"layers": [1, 1, 1, 1], "width": 32, "patch_size": None}},
    "rn16": {"image": {"layers": [1, 1, 1, 1], "width": 16, "patch_size": None}},
    "rn24": {"image": {"layers": [1, 1, 1, 1], "width": 24, "patch_size": None}},
    "vit": {"image": {"layers": 4, "width": 192, "patch_size": 8, "head_width": 32}},
}


def _render_split(
    split: str, n: int, size: int, seed: int
) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    items = [render(i, seed=seed, split=split, domain=i % len(DOMAINS), image_size=size) for i in range(n)]
    images = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2).contiguous()
    return (
        images,
        [it.caption for it in items],
        torch.tensor([it.label for it in items]),
        torch.tensor([it.domain for it in items]),
    )


def main(
    arch: str = "rn",
    minutes: float = 8.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    schedule: str = "constant",
    warmup: int = 100,
    image_size: int = 64,
    model_size: int = 0,
    num_train: int = 20000,
    embed_dim: int = 128,
    text_layers: int = 2,
    text_width: int = 128,
    eval_every_s: float = 60.0,
    out: str = "",
    seed: int = 0,
    threads: int = 2,
):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    t0 = time.time()
    tr_img, tr_cap, _, _ = _render_split("train", num_train, image_size, seed)
    va_img, _, va_lab, va_dom = _render_split("val", 1400, image_size, seed)
    print(f"rendered in {time.time() - t0:.1f}s", flush=True)
    model_size = model_size or image_size
    if model_size != image_size:  # the model's own preprocessing resizes the rendered images
        shrink = lambda x: (
            F.interpolate(x.float(), size=model_size, mode="bilinear", antialias=True)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )
        tr_img, va_img = shrink(tr_img), shrink(va_img)
    vision = dict(ARCHS[arch]["image"], image_size=model_size)
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": text_width, "heads": 4, "layers": text_layers},
    }
    model = open_clip.CLIP(**cfg)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    tr_tok = tok(tr_cap)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    norm = lambda x: (x.float() / 255 - mean) / std
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    names = class_names()
    budget = minutes * 60
    curve, step, next_eval = [], 0, eval_every_s
    t_start = time.time()

    def evaluate():
        model.eval()
        with torch.no_grad():
            bank = open_clip.build_zero_shot_classifier(
                model, tok, names, ZERO_SHOT_TEMPLATES, num_classes_per_batch=None
            )
            feats = torch.cat(
                [model.encode_image(norm(va_img[i : i + 256]), normalize=True) for i in range(0, len(va_img), 256)]
            )
            pred = (feats @ bank).argmax(1)
        model.train()
        acc = {d: float((pred[va_dom == k] == va_lab[va_dom == k]).float().mean()) for k, d in enumerate(DOMAINS)}
        return acc

    while True:
        elapsed = time.time() - t_start
        if elapsed >= next_eval or elapsed >= budget:
            train_time = elapsed
            acc = evaluate()
            mean_acc = sum(acc.values()) / len(acc)
            curve.append({"minutes": round(train_time / 60, 2), "step": step, "mean_top1": mean_acc, **acc})
            print(json.dumps(curve[-1]), flush=True)
            t_start += time.time() - t_start - train_time  # do not charge evaluation to training time
            next_eval += eval_every_s
            if elapsed >= budget:
                break
        idx = torch.randint(0, num_train, (batch_size,))
        if schedule == "cosine":
            # Assume steps/sec measured so far to turn the time budget into a step budget.
            frac = min(1.0, (time.time() - t_start) / budget)
            cur = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
            for g in opt.param_groups:
                g["lr"] = cur
        img_f, txt_f, scale = model(norm(tr_img[idx]), tr_tok[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
    result = {
        "config": dict(
            arch=arch,
            minutes=minutes,
            batch_size=batch_size,
            lr=lr,
            schedule=schedule,
            image_size=image_size,
            model_size=model_size,
            num_train=num_train,
            embed_dim=embed_dim,
            text_layers=text_layers,
        ),
        "params_image": sum(p.numel() for p in model.visual.parameters()),
        "curve": curve,
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
