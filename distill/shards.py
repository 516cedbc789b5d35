"""WebDataset shards: image-text pairs as ``.tar`` shards plus ``dataset.json``; written, checked and read here.

A sample is three files sharing a key in a shard ``<split>-NNNNNN.tar``: ``<key>.png`` (or
``.jpg``/``.webp``: the image bytes as given, never re-encoded), ``<key>.txt`` (the caption) and
``<key>.json`` (``{"class": name, "domain": name}``, both optional). ``dataset.json`` is the
index: per split the shards in order with their sample counts and SHA-256 digests and every
sample key in order (a sample's ``index`` is its position in the split), plus the class names
(label order), domain names, OOD domains and templates. Shards are written to a temporary file
and renamed into place, ``dataset.json`` last: a folder a reader accepts is complete. No
Lightning. Command line::

    python -m distill.shards csv --csv data/train.csv --root data --output_dir shards --split train
    python -m distill.shards shapesworld --output_dir shards --num_train 20000 --train_domains [flat,outline]
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import sys
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from webdataset import TarWriter

from distill import shapesworld as sw
from distill.files import atomic_write, atomic_write_text

METADATA = "dataset.json"
FORMAT = "distill-webdataset"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_NAME = re.compile(r"[A-Za-z0-9_]+")  # split names
_KEY = re.compile(r"[A-Za-z0-9_\-]+")  # no dots: webdataset splits a file name at its first dot

Unlabelled = Literal["error", "retrieval_only"]


# Metadata ----------------------------------------------------------------------------------------
@dataclass
class SplitIndex:
    """One split of ``dataset.json``: shard files in order, their sample counts and SHA-256 digests,
    every sample key in order, the class and domain names present, the samples without a class."""

    shards: list[str]
    counts: list[int]
    digests: list[str]
    keys: list[str]
    classes: list[str]
    domains: list[str]
    unlabelled: int = 0

    def item_keys(self) -> list[str]:
        """A content key per sample: its shard's digest (96 bits) and its key. A changed sample changes its
        shard's bytes, hence its key (a teacher cache never takes it for the old one)."""
        return [
            f"{d[:24]}/{k}" for d, n, o in zip(self.digests, self.counts, self.offsets) for k in self.keys[o : o + n]
        ]

    @cached_property
    def offsets(self) -> list[int]:
        """Index of the first sample of each shard, then the total."""
        return [0, *itertools.accumulate(self.counts)]

    def shard_of(self, index: int) -> int:
        """The shard (position in ``shards``) holding sample ``index``."""
        return bisect_right(self.offsets, index) - 1


@dataclass
class ShardsMeta:
    """The contents of ``dataset.json``."""

    classnames: list[str]
    domain_names: list[str]
    ood_domains: list[str]
    templates: list[str] | None
    splits: dict[str, SplitIndex]

    def write(self, folder: Path) -> None:
        """Write ``<folder>/dataset.json`` atomically (compact: it lists every sample key)."""
        atomic_write_text(folder / METADATA, json.dumps({"format": FORMAT, "version": 1, **asdict(self)}))


def load_metadata(root: str | Path) -> ShardsMeta:
    """Read and check ``<root>/dataset.json``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a distill shard index, or fields that disagree (naming the file).
    """
    path = Path(root) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write shards with `python -m distill.shards csv|shapesworld`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); write the shards again") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("splits"), dict):
        raise ValueError(f"{path} is not a distill shard index (expected format {FORMAT!r} and a 'splits' table)")
    try:
        splits = {name: SplitIndex(**record) for name, record in data["splits"].items()}
        names = [list(data[k]) for k in ("classnames", "domain_names", "ood_domains")]
        meta = ShardsMeta(*names, data["templates"], splits)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: a field is missing or malformed ({type(err).__name__}: {err})") from err
    for name, split in splits.items():
        if not len(split.shards) == len(split.counts) == len(split.digests) or sum(split.counts) != len(split.keys):
            raise ValueError(
                f"{path}: split {name!r} lists {len(split.shards)} shards, {len(split.digests)} digests, "
                f"{len(split.counts)} counts summing to {sum(split.counts)} and {len(split.keys)} keys; they must agree"
            )
        if any(Path(shard).name != shard for shard in split.shards):
            raise ValueError(f"{path}: split {name!r} names shard files outside its folder")
    return meta


# Writing -----------------------------------------------------------------------------------------
def _encode(sample: Mapping[str, Any], where: str, seen: set[str], classnames, domain_names) -> dict[str, Any]:
    key, image, caption = sample.get("key"), sample.get("image"), sample.get("caption")
    if not isinstance(key, str) or not _KEY.fullmatch(key) or key in seen:
        raise ValueError(f"{where}: key {key!r} must be unique and made of letters, digits, '_' and '-'")
    ext = str(sample.get("ext", "")).lower().lstrip(".")
    if ext not in IMAGE_EXTS or not isinstance(image, (bytes, bytearray)) or not image:
        raise ValueError(f"{where} ({key}): needs image bytes and an ext in {IMAGE_EXTS}, got ext {ext!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where} ({key}): empty caption")
    meta = {field: sample[field] for field in ("class", "domain") if sample.get(field)}
    for field, names in (("class", classnames), ("domain", domain_names)):
        if names is not None and field in meta and meta[field] not in names:
            raise ValueError(f"{where} ({key}): {field} {meta[field]!r} is not in the given {field} list")
    seen.add(key)
    return {"__key__": key, ext: bytes(image), "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode()}


class _Hashing:
    """A file handle's ``write`` that also hashes what it writes (the shard's digest, at no extra read)."""

    def __init__(self) -> None:
        self.handle, self.sha256 = None, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.handle.write(data)


def _names(given: Sequence[str] | None, old: list[str], found: Iterable[Iterable[str]]) -> list[str]:
    """A name list after a split was written: ``given``, else the old one, or (sorted) all names found."""
    if given is not None:
        return list(given)
    everything = set().union(*map(set, found))
    return old if everything <= set(old) else sorted(everything | set(old))


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    output_dir: str | Path,
    split: str,
    max_samples_per_shard: int = 1000,
    classnames: Sequence[str] | None = None,
    domain_names: Sequence[str] | None = None,
    ood_domains: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write one split as shards ``<split>-NNNNNN.tar`` and record it in ``dataset.json``.

    Other splits of ``dataset.json`` stay; a split written again replaces its old entry (which
    leaves ``dataset.json`` before its shards are rewritten) and its old shards. Samples are read
    lazily, one shard at a time.

    Args:
        samples: dicts ``key`` (letters, digits, ``_``, ``-``; unique in the split), ``image``
            (encoded bytes), ``ext`` (png, jpg, jpeg, webp), ``caption`` and optional ``class`` and
            ``domain`` names (``domain`` reads as ``default`` when left out).
        output_dir: the shard folder (created if missing).
        split: split name, e.g. ``train``.
        max_samples_per_shard: samples per shard file.
        classnames: the class list in label order (default: the old list, or the sorted names found).
        domain_names: the domain list (default: the old list, or the sorted names found).
        ood_domains: out-of-distribution domains (default: the old ones).
        templates: zero-shot templates with one ``{}`` (default: the old ones, or none).

    Returns:
        ``{"split", "samples", "shards", "dataset_json"}``.
    """
    out = Path(output_dir)
    if not _NAME.fullmatch(split) or max_samples_per_shard < 1:
        raise ValueError(f"split {split!r} must be letters, digits and '_', max_samples_per_shard at least 1")
    try:
        meta = load_metadata(out) if (out / METADATA).exists() else ShardsMeta([], [], [], None, {})
    except ValueError as err:
        raise ValueError(f"{err}; remove it to write a new shard folder there") from err
    old = meta.splits.pop(split, None)
    for given, field in ((classnames, "classes"), (domain_names, "domains")):
        for name, other in meta.splits.items() if given is not None else ():
            if set(getattr(other, field)) - set(given):
                raise ValueError(f"split {name!r} of {out / METADATA} has {field} not in the ones given")
    if ood_domains is not None and domain_names is not None and set(ood_domains) - set(domain_names):
        raise ValueError(f"ood_domains {sorted(set(ood_domains) - set(domain_names))} are not in domain_names")
    out.mkdir(parents=True, exist_ok=True)
    if old is not None:  # never describe shards while they are rewritten
        meta.write(out)
    record, seen, stream = SplitIndex([], [], [], [], [], []), set(), iter(samples)
    for number in itertools.count():
        first = list(itertools.islice(stream, 1))  # peek: never open an empty shard
        if not first:
            break
        name = f"{split}-{number:06d}.tar"
        file = _Hashing()
        with atomic_write(out / name, "wb") as file.handle, TarWriter(file, encoder=False, mtime=0, user="") as tar:
            for sample in itertools.chain(first, itertools.islice(stream, max_samples_per_shard - 1)):
                fields = _encode(sample, f"{split} sample {len(record.keys)}", seen, classnames, domain_names)
                tar.write(fields)
                found = json.loads(fields["json"])
                record.keys.append(fields["__key__"])
                record.classes.append(found.get("class", ""))
                record.domains.append(found.get("domain", "default"))
        record.shards.append(name)
        record.counts.append(len(record.keys) - sum(record.counts))
        record.digests.append(file.sha256.hexdigest())
    if not record.keys:
        raise ValueError(f"no samples to write for split {split!r}")
    record.unlabelled = record.classes.count("")
    record.classes, record.domains = sorted(set(record.classes) - {""}), sorted(set(record.domains))
    splits = [*meta.splits.values(), record]
    meta.classnames = _names(classnames, meta.classnames, (s.classes for s in splits))
    meta.domain_names = _names(domain_names, meta.domain_names, (s.domains for s in splits))
    meta.ood_domains = list(ood_domains) if ood_domains is not None else meta.ood_domains
    if set(meta.ood_domains) - set(meta.domain_names):
        raise ValueError(f"ood_domains {meta.ood_domains} are not all among the domains {meta.domain_names}")
    meta.templates = list(templates) if templates is not None else meta.templates
    meta.splits[split] = record
    meta.write(out)
    for stale in out.glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{split}-\d{{6}}\.tar", stale.name) and stale.name not in record.shards:
            stale.unlink()
    return {"split": split, "samples": len(record.keys), "shards": record.shards, "dataset_json": str(out / METADATA)}


def _csv_samples(csv_path: Path, root: Path, split: str, columns: tuple[str, str, str, str], classnames) -> list[dict]:
    """The rows of a pairs CSV as samples (image bytes read lazily), every row checked first."""
    image_column, caption_column, class_column, domain_column = columns
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    reader = csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"), newline=""))
    rows = [(reader.line_num, row) for row in reader]
    header = list(reader.fieldnames or [])
    for column in (image_column, caption_column):
        if column not in header:
            raise KeyError(f"{csv_path}: no column {column!r} (columns: {header})")
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    samples = []
    for position, (line, row) in enumerate(rows):
        where, image, name = f"{csv_path} line {line}", root / (row[image_column] or ""), row.get(class_column) or ""
        if None in row.values() or not row[caption_column].strip():
            raise ValueError(f"{where}: empty {caption_column!r} cell (or too few cells); every pair needs a caption")
        if not row[image_column] or not image.is_file() or image.suffix.lower()[1:] not in IMAGE_EXTS:
            raise FileNotFoundError(f"{where}: image file not found, or not one of {IMAGE_EXTS}: {image}")
        if classnames is not None and name.strip() and name not in classnames:
            raise ValueError(f"{where}: class {name!r} is not in classnames")
        sample = {
            "key": f"{split}_{position:08d}",
            "image": image,
            "ext": image.suffix[1:],
            "caption": row[caption_column],
        }
        samples.append({**sample, "class": name if name.strip() else None, "domain": row.get(domain_column) or None})
    return samples


def csv_to_shards(
    csv: str,
    root: str,
    output_dir: str,
    split: str = "train",
    image_column: str = "filepath",
    caption_column: str = "caption",
    class_column: str = "classname",
    domain_column: str = "domain",
    classnames: list[str] | None = None,
    ood_domains: list[str] | None = None,
    templates: list[str] | None = None,
    max_samples_per_shard: int = 1000,
) -> dict[str, Any]:
    """Write a pairs CSV (as ``ImageTextDataModule`` reads it) as shards of one split.

    Every row is checked before anything is written (columns, caption, image file, class); the
    image files are copied byte for byte (checked for decoding when read). Sample keys are
    ``<split>_<row position>``.

    Args:
        csv: the CSV file (header row, then one row per pair).
        root: folder the image paths are relative to.
        output_dir: the shard folder.
        split: split name.
        image_column: column with the image path.
        caption_column: column with the caption.
        class_column: column with the class name (optional column).
        domain_column: column with the domain name (optional column).
        classnames: the class list in label order (default: sorted names found, over all splits written).
        ood_domains: out-of-distribution domain names.
        templates: zero-shot prompt templates with one ``{}``.
        max_samples_per_shard: samples per shard file.
    """
    columns = (image_column, caption_column, class_column, domain_column)
    samples = _csv_samples(Path(csv), Path(root), split, columns, classnames)
    known = load_metadata(output_dir).domain_names if (Path(output_dir) / METADATA).exists() else []
    unknown = set(ood_domains or []) - {s["domain"] or "default" for s in samples} - set(known)
    if unknown:
        raise ValueError(f"ood_domains {sorted(unknown)} occur neither in {csv} nor in {output_dir}/{METADATA}")
    stream = ({**s, "image": s["image"].read_bytes()} for s in samples)
    return write_shards(stream, output_dir, split, max_samples_per_shard, classnames, None, ood_domains, templates)


def shapesworld_to_shards(
    output_dir: str,
    train_domains: list[str] | None = None,
    ood_domains: list[str] | None = None,
    num_train: int = 20000,
    num_val: int = 1400,
    num_test: int = 2800,
    seed: int = 0,
    image_size: int = 64,
    task: str = "shape",
    num_colours: int = len(sw.COLOURS),
    second_object_prob: float = 0.0,
    max_samples_per_shard: int = 1000,
) -> list[dict[str, Any]]:
    """Write ShapesWorld's train, val and test splits as shards (PNG images).

    The items are those of ``write_image_folder`` and ``ShapesWorldDataModule`` with the same
    arguments: train cycles through ``train_domains``, val and test through the training domains
    then ``ood_domains``, every class in turn.

    Args:
        output_dir: the shard folder.
        train_domains: domains of the training split (default: all).
        ood_domains: held-out domains, added to val and test (default: every domain not trained on).
        num_train: training items.
        num_val: validation items.
        num_test: test items.
        seed: world seed.
        image_size: image side in pixels.
        task: ``shape``, ``shape_colour``, ``shape_size`` or ``shape_position``.
        num_colours: colours in use.
        second_object_prob: chance of a distractor object.
        max_samples_per_shard: samples per shard file.
    """
    train = list(train_domains or sw.DOMAINS)
    ood = [d for d in sw.DOMAINS if d not in train] if ood_domains is None else list(ood_domains)
    unknown, both = sorted(set(train + ood) - set(sw.DOMAINS)), sorted(set(train) & set(ood))
    if unknown or both or min(num_train, num_val, num_test) < 1:
        raise ValueError(
            f"unknown ShapesWorld domain(s) {unknown}; known: {list(sw.DOMAINS)}" if unknown
            else f"domains {both} are both in train_domains and ood_domains" if both
            else "num_train, num_val and num_test must each be at least 1"
        )  # fmt: skip
    classes = sw.class_names(task, num_colours)

    def items(split: str, count: int, domains: list[str]) -> Iterator[dict[str, Any]]:
        for i in range(count):
            domain, label = sw.domain_and_label(i, domains, range(len(classes)))
            world = dict(seed=seed, image_size=image_size, task=task, num_colours=num_colours, label=label)
            item = sw.render(
                i, split=split, domain=sw.DOMAINS.index(domain), second_object_prob=second_object_prob, **world
            )
            png = io.BytesIO()
            Image.fromarray(item.image).save(png, format="PNG")  # the bytes write_image_folder's PNG files hold
            yield {"key": f"{split}_{i:08d}", "image": png.getvalue(), "ext": "png", "caption": item.caption,
                   "class": classes[label], "domain": domain}  # fmt: skip

    plan = {"train": (num_train, train), "val": (num_val, train + ood), "test": (num_test, train + ood)}
    task_info = (classes, list(sw.DOMAINS), ood, sw.ZERO_SHOT_TEMPLATES)
    return [
        write_shards(items(split, count, domains), output_dir, split, max_samples_per_shard, *task_info)
        for split, (count, domains) in plan.items()
    ]


if __name__ == "__main__":
    from jsonargparse import CLI

    try:
        result = CLI({"csv": csv_to_shards, "shapesworld": shapesworld_to_shards}, as_positional=False)
    except (ValueError, KeyError, FileNotFoundError) as err:  # bad input: one line, no traceback
        sys.exit(f"python -m distill.shards: error: {err.args[0] if err.args else err}")
    for done in result if isinstance(result, list) else [result]:
        print(f"{done['split']}: {done['samples']} samples in {len(done['shards'])} shard(s); {done['dataset_json']}")
