"""ShapesWorld written as CoOp split files: the classification-data layout of the prompt-learning papers.

A split file ``split_zhou_<Name>.json`` is a JSON object with the lists ``train``, ``val`` and
``test``; each entry is ``[relative_image_path, label, classname]``. This module renders
ShapesWorld items to PNG files and writes such files, so the split-file datamodule (few-shot and
base-to-novel protocols) runs on the embedded world exactly as on a downloaded data set:

```
<root>/images/<domain>/<split>_<index>.png     the images (64 px by default)
<root>/split_zhou_<name>.json                  train / val / test over the training domains
<root>/split_zhou_<name>_<domain>.json         one per held-out domain: a "test" list only
<root>/classnames.txt                          one class name per line, in label order
```

Run ``python -m distill.shapesworld_splits --root data/shapes_splits`` (``--help`` lists the options).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from distill import shapesworld as sw
from distill.files import atomic_write_text

#: Writing more items than this shows a progress bar.
PROGRESS_FROM = 2000


def _check_domains(names: Sequence[str], key: str) -> list[str]:
    unknown = [d for d in names if d not in sw.DOMAINS]
    if unknown:
        raise ValueError(f"{key}: unknown ShapesWorld domain(s) {unknown}; known: {list(sw.DOMAINS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key} lists a domain twice: {list(names)}")
    return list(names)


def write_split_files(
    root: str,
    name: str = "ShapesWorld",
    task: str = "shape_position",
    train_domains: Sequence[str] = ("flat", "outline", "texture", "shaded"),
    ood_domains: Sequence[str] = ("sketch", "pixel", "night"),
    num_train: int = 3200,
    num_val: int = 1280,
    num_test: int = 1280,
    image_size: int = 64,
    seed: int = 0,
    num_colours: int = 10,
) -> dict[str, str]:
    """Render ShapesWorld items to PNG files and list them in CoOp split files.

    Items of a split cycle through its domains fastest and through the classes once per round
    of domains (:func:`distill.shapesworld.domain_and_label`), so each split is balanced over
    domains and classes when its size is a multiple of ``domains x classes``. Every item is a
    pure function of ``(seed, split, index)``; each held-out domain gets its own ``num_test``
    test items (indices after the main test split's, so no item repeats another in a new style).
    The JSON files are written atomically after all images, the main split file last: when it
    exists, the export is complete.

    Args:
        root: output folder (created if missing).
        name: data set name: the files are ``split_zhou_<name>.json`` and
            ``split_zhou_<name>_<domain>.json``.
        task: what a label names: ``shape`` (16 classes), ``shape_colour`` (shape x colour),
            ``shape_size`` (shape x 3 sizes) or ``shape_position`` (shape x 5 positions, 80 classes).
        train_domains: domains of the main split file (train, val and test).
        ood_domains: held-out domains, one test-only split file each.
        num_train: training items (main file).
        num_val: validation items (main file).
        num_test: test items of the main file, and of each held-out domain's file.
        image_size: image side in pixels.
        seed: world seed.
        num_colours: colours in use (at most 10).

    Returns:
        ``{"main": main split file, <ood domain>: its split file, ...}``; the class names are in
        ``<root>/classnames.txt``.

    Raises:
        ValueError: an unknown or repeated domain, a domain both trained on and held out, a bad
            name, or a split too small to hold every class in every one of its domains.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"name must be letters, digits, '_' or '-' (it names files), got {name!r}")
    train_names = _check_domains(train_domains, "train_domains")
    ood_names = _check_domains(ood_domains, "ood_domains")
    if not train_names:
        raise ValueError("train_domains is empty: the main split file needs at least one domain")
    overlap = sorted(set(train_names) & set(ood_names))
    if overlap:
        raise ValueError(f"domains {overlap} are both in train_domains and ood_domains")
    if not 1 <= num_colours <= len(sw.COLOURS):
        raise ValueError(f"num_colours must be in [1, {len(sw.COLOURS)}], got {num_colours}")
    classes = sw.class_names(task, num_colours)  # raises on an unknown task
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [16, 1024], got {image_size}")
    # Every class in every domain of every list: the datamodule needs labels 0..C-1 all present.
    needed = len(train_names) * len(classes)
    for key, count in {"num_train": num_train, "num_val": num_val, "num_test": num_test}.items():
        if count < needed:
            raise ValueError(
                f"{key}={count} is too small: {len(classes)} {task} classes x {len(train_names)} domain(s) need at "
                f"least {needed} items so every class appears in every domain"
            )

    out = Path(root)
    for domain in train_names + ood_names:
        (out / "images" / domain).mkdir(parents=True, exist_ok=True)
    render_kwargs = dict(seed=seed, image_size=image_size, task=task, num_colours=num_colours)
    total = num_train + num_val + num_test * (1 + len(ood_names))
    progress = tqdm(total=total, desc=f"writing {name} split files", disable=total < PROGRESS_FROM)

    def write(split: str, count: int, domains: list[str], offset: int = 0) -> list[list]:
        entries = []
        for i in range(count):
            domain, label = sw.domain_and_label(i, domains, range(len(classes)))
            index = offset + i
            item = sw.render(index, split=split, domain=sw.DOMAINS.index(domain), label=label, **render_kwargs)
            relative = f"images/{domain}/{split}_{index:06d}.png"
            Image.fromarray(item.image).save(out / relative, compress_level=1)  # fast; 64 px PNGs are small
            entries.append([relative, label, classes[label]])
            progress.update()
        return entries

    main = {split: write(split, count, train_names) for split, count in zip(sw.SPLITS, (num_train, num_val, num_test))}
    ood = {d: write("test", num_test, [d], offset=num_test * (j + 1)) for j, d in enumerate(ood_names)}
    progress.close()

    atomic_write_text(out / "classnames.txt", "".join(f"{c}\n" for c in classes))
    paths = {}
    for domain, entries in ood.items():
        paths[domain] = str(atomic_write_text(out / f"split_zhou_{name}_{domain}.json", _split_json({"test": entries})))
    main_path = atomic_write_text(out / f"split_zhou_{name}.json", _split_json(main))  # last: the export is complete
    return {"main": str(main_path), **paths}


def _split_json(splits: dict[str, list[list]]) -> str:
    """A split file's JSON text with one entry per line (readable, and diffs stay small)."""
    blocks = []
    for split in sw.SPLITS:
        lines = ",\n".join(f"    {json.dumps(entry)}" for entry in splits.get(split, []))
        blocks.append(f'  "{split}": [\n{lines}\n  ]' if lines else f'  "{split}": []')
    return "{\n" + ",\n".join(blocks) + "\n}\n"


if __name__ == "__main__":
    from jsonargparse import CLI

    print(json.dumps(CLI(write_split_files, as_positional=False), indent=2))
