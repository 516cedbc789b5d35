"""Reading CoOp split files: the entries, class names, base / novel classes and few-shot samples.

A split file ``split_zhou_<Name>.json`` (the layout of CoOp / CoCoOp / Dassl, named after the
dataset, e.g. ``split_zhou_OxfordPets.json``) is a JSON object with the lists ``train``, ``val``
and ``test``; each entry is ``[relative_image_path, label, classname]``, the path relative to the
dataset's image root, the label an int in 0..C-1 and the class name as the dataset spells it
(often with underscores). ``distill.shapesworld_splits`` writes ShapesWorld in this layout, and
``distill.datamodules.split_file_datamodule`` serves it to a Trainer.

Every reader checks what it reads and raises a one-line error naming the file (for a split file
also the list and the index of the bad entry).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distill.datamodules.base import SPLITS

ClassSplit = Literal["all", "base", "novel"]

_FORMAT = (
    'a JSON object {"train": [...], "val": [...], "test": [...]} of [relative_image_path, label, classname] entries'
)


@dataclass(frozen=True)
class SplitEntry:
    """One checked entry of a split file.

    Attributes:
        path: image path relative to the data root.
        label: class index.
        classname: class name as the file spells it.
        file: the split file it comes from.
        split: the list it sits in (``train``, ``val`` or ``test``).
        position: its index in that list.
    """

    path: str
    label: int
    classname: str
    file: Path
    split: str
    position: int

    def where(self) -> str:
        """``<file> <split> entry <position>``, for messages."""
        return f"{self.file} {self.split} entry {self.position}"


def read_split_file(path: str | Path, required: Sequence[str] = SPLITS) -> dict[str, list[SplitEntry]]:
    """The checked entries of a split file, by list name (lists not in ``required`` may be absent).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not an object of lists, or an entry that is not
            ``[path, label >= 0, classname]`` (the message names the list and the entry index).
        KeyError: a required list is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON split file ({err}); expected {_FORMAT}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected {_FORMAT}")
    missing = [s for s in required if s not in data]
    if missing:
        raise KeyError(
            f"{path}: no {' / '.join(json.dumps(s) for s in missing)} list (keys: {json.dumps(list(data))}); "
            f"expected {_FORMAT}"
        )
    entries: dict[str, list[SplitEntry]] = {}
    for split in SPLITS:
        raw = data.get(split, [])
        if not isinstance(raw, list):
            raise ValueError(f"{path}: {split!r} is a JSON {type(raw).__name__}, expected a list of entries")
        entries[split] = [_entry(path, split, i, item) for i, item in enumerate(raw)]
    return entries


def _entry(path: Path, split: str, position: int, item: object) -> SplitEntry:
    ok = isinstance(item, list) and len(item) == 3
    if ok:
        image, label, classname = item
        ok = isinstance(image, str) and bool(image) and isinstance(classname, str) and bool(classname.strip())
        ok = ok and isinstance(label, int) and not isinstance(label, bool) and label >= 0
    if not ok:
        shown = json.dumps(item)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise ValueError(
            f"{path} {split} entry {position} is {shown}; each entry must be [relative_image_path, label (int >= 0), "
            "classname]"
        )
    return SplitEntry(image, label, classname, path, split, position)


def read_classnames_file(path: str | Path) -> list[str]:
    """Class names in label order from a ``.txt`` or ``.json`` file.

    Text: one name per line; when every line starts with a WordNet folder id (``n01440764
    tench``, as CoOp's ImageNet ``classnames.txt``) the id is dropped. JSON: a list of names, or an
    object ``{label: name}`` whose keys are 0..C-1.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty name, bad JSON, or JSON keys that are not 0..C-1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classnames file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err}); expected a list of names or {{label: name}}") from err
        if isinstance(data, dict):
            try:
                by_label = {int(k): v for k, v in data.items()}
            except ValueError as err:
                raise ValueError(f"{path}: keys must be integer labels, got {list(data)[:5]}") from err
            if sorted(by_label) != list(range(len(by_label))):
                raise ValueError(f"{path}: labels must be 0..{len(by_label) - 1} with none missing")
            data = [by_label[i] for i in range(len(by_label))]
        if not isinstance(data, list) or not all(isinstance(n, str) and n.strip() for n in data):
            raise ValueError(f"{path}: expected a list of non-empty names or an object {{label: name}}")
        return [n.strip() for n in data]
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no class names (expected one name per line, in label order)")
    if all(re.fullmatch(r"n\d{8}\s+\S.*", line) for _, line in lines):  # "<wordnet id> <name>"
        return [line.split(maxsplit=1)[1].strip() for _, line in lines]
    return [line for _, line in lines]


def class_subset(num_classes: int, which: ClassSplit) -> list[int]:
    """Labels of a class split: base = the first ceil(C/2) labels (sorted by label), novel = the rest."""
    n_base = math.ceil(num_classes / 2)
    subsets = {"all": range(num_classes), "base": range(n_base), "novel": range(n_base, num_classes)}
    if which not in subsets:
        raise ValueError(f"unknown class split {which!r}; choose one of all, base, novel")
    return list(subsets[which])


def sample_shots(
    entries: Sequence[SplitEntry], labels: Sequence[int], shots: int, seed: int, split: str, names: Sequence[str]
) -> list[SplitEntry]:
    """``shots`` entries of each of ``labels``, sampled under ``seed`` from ``entries`` (the ``split``
    list of a split file; ``names`` are the class names, for messages); returned in file order.

    Each class draws with its own ``random.Random(f"{seed}/{split}/{label}")`` from its entries
    sorted by image path, so the selection depends neither on the order of the JSON entries nor
    on which other classes are sampled (base-only training picks the same images as all-class).

    Raises:
        ValueError: a class has fewer than ``shots`` entries (names the class and its count).
    """
    by_label: dict[int, list[SplitEntry]] = defaultdict(list)
    for e in entries:
        by_label[e.label].append(e)
    chosen = []
    for label in labels:
        pool = sorted(by_label[label], key=lambda e: (e.path, e.position))
        if len(pool) < shots:
            source = f"{entries[0].file}: " if entries else ""
            raise ValueError(
                f"{source}class {names[label]!r} (label {label}) has {len(pool)} {split} item(s), fewer than the "
                f"{shots} {split} shots per class asked for; lower shots"
            )
        chosen += random.Random(f"{seed}/{split}/{label}").sample(pool, shots)
    return sorted(chosen, key=lambda e: e.position)
