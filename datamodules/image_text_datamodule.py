"""Image-text pairs from CSV files: the path for a user's own data.

Everything about the files is checked once, when the datamodule is built (before a Trainer
exists, so a bad input stops the run before any folder is written or any work starts): the
CSV's format and columns, that every row has a class when the class column exists, that every
image file exists and is readable. Errors name the CSV file, its lines as an editor shows them
(header = line 1) and the column or image file at fault.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from distill.datamodules.base import VisionLanguageDataModule
from distill.datamodules.common import AugmentPolicy, sample_views

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]

UnlabelledRows = Literal["error", "retrieval_only"]

#: A CSV with more rows than this shows a progress bar while its images are checked.
PROGRESS_FROM = 1000


class UnreadableImageError(ValueError):
    """An image file of a pairs CSV cannot be opened or decoded."""


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable image (``"<error type>: <message>"``), or None when it is.

    A fast check: a PNG's chunk structure and checksums (``PIL.Image.verify``, no
    decompression); a JPEG decoded at 1/8 scale; any other format decoded in full.
    """
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                image.draft("RGB", (1, 1))  # JPEG: the smallest DCT scale; no-op for other formats
                image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return f"{type(err).__name__}: {err}"
    return None


def _some(items: Sequence, shown: int = 5) -> str:
    """The first ``shown`` items, then how many more."""
    head = ", ".join(str(i) for i in items[:shown])
    return f"{head} and {len(items) - shown} more" if len(items) > shown else head


def _rows(count: int) -> str:
    return f"{count} row{'s' if count != 1 else ''}"


@dataclass
class PairsCsv:
    """The checked rows of one pairs CSV.

    Attributes:
        path: the CSV file.
        rows: its rows (header keys -> cells), without the skipped ones.
        lines: the CSV line of each row (header = line 1), as an editor shows it.
        has_class_column: whether the header names the class column.
        unlabelled_lines: lines of the rows whose class cell is empty (kept, label -1).
        skipped: ``(line, image file, problem)`` of the rows left out for a bad image.
    """

    path: Path
    rows: list[dict[str, str]]
    lines: list[int]
    has_class_column: bool
    unlabelled_lines: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)


def expected_format(image_column: str, caption_column: str, class_column: str, domain_column: str) -> str:
    """What ``ImageTextDataModule`` reads, with the column names the user configured."""
    return (
        f"a CSV file with a header row naming the columns {image_column!r}, {caption_column!r} and optionally "
        f"{class_column!r}, {domain_column!r}, then one row per image-text pair"
    )


def read_pairs_csv(
    path: str | Path,
    root: Path,
    image_column: str = "filepath",
    caption_column: str = "caption",
    class_column: str = "classname",
    domain_column: str = "domain",
    unlabelled_rows: UnlabelledRows = "error",
    skip_bad_images: bool = False,
    classnames: Sequence[str] | None = None,
) -> PairsCsv:
    """Read and check a CSV of image-text pairs; image paths resolve against ``root``.

    Raises:
        FileNotFoundError: no such CSV, or image files missing under ``root``.
        ValueError: a JSON (split) file, no data rows, rows with an empty caption, rows without a
            class (unless ``unlabelled_rows="retrieval_only"``), a class not in ``classnames``
            (when given), unreadable images (``UnreadableImageError``, unless ``skip_bad_images``).
        KeyError: the image or caption column is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    expected = expected_format(image_column, caption_column, class_column, domain_column)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not part of the header
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); ImageTextDataModule expects {expected}") from err
    if path.suffix.lower() in (".json", ".jsonl") or text.lstrip()[:1] in ("{", "["):
        raise ValueError(
            f"{path} is a JSON file (a CoOp/Dassl-style split file?), but ImageTextDataModule reads CSV files: "
            f"{expected}. Read CoOp split files with SplitFileDataModule."
        )
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, lines = [], []
    for row in reader:
        rows.append(row)
        lines.append(reader.line_num)
    if not rows:
        raise ValueError(f"{path}: no rows; ImageTextDataModule expects {expected}")
    columns = list(reader.fieldnames or [])
    for column in (image_column, caption_column):
        if column not in columns:
            raise KeyError(f"{path}: no column {column!r} (columns: {columns}); ImageTextDataModule expects {expected}")
    short = [n for r, n in zip(rows, lines) if None in r.values()]
    if short:
        raise ValueError(f"{path}: line(s) {_some(short)} have fewer cells than the header's {len(columns)} columns")
    no_caption = [n for r, n in zip(rows, lines) if not (r[caption_column] or "").strip()]
    if no_caption:
        raise ValueError(
            f"{path}: {_rows(len(no_caption))} with an empty {caption_column!r} cell, on line(s) "
            f"{_some(no_caption)} (header = line 1): every image-text pair needs a caption"
        )
    table = PairsCsv(path, rows, lines, has_class_column=class_column in columns)
    if table.has_class_column and classnames is not None:
        cells = [(n, r[class_column]) for r, n in zip(rows, lines) if r[class_column].strip()]
        unknown = [f"line {n}: {name!r}" for n, name in cells if name not in classnames]
        if unknown:
            raise ValueError(
                f"{path}: {_rows(len(unknown))} with a class not in classnames, e.g. {_some(unknown, 3)} "
                f"(classnames: {_some(list(classnames))})"
            )
    if table.has_class_column:
        table.unlabelled_lines = [n for r, n in zip(rows, lines) if not (r[class_column] or "").strip()]
    if table.unlabelled_lines and unlabelled_rows != "retrieval_only":
        raise ValueError(
            f"{path}: {_rows(len(table.unlabelled_lines))} with an empty {class_column!r} cell, on line(s) "
            f"{_some(table.unlabelled_lines)} (header = line 1): give every row a class, or set "
            "unlabelled_rows=retrieval_only to keep such rows for retrieval only"
        )
    _check_images(table, root, image_column, skip_bad_images)
    return table


def _check_images(table: PairsCsv, root: Path, image_column: str, skip_bad_images: bool) -> None:
    """Every image of ``table`` exists and decodes; bad ones are an error, or skipped and counted."""
    missing = [
        f"line {n}: {r[image_column] or f'(empty {image_column!r} cell)'}"
        for r, n in zip(table.rows, table.lines)
        if not (r[image_column] and (root / r[image_column]).is_file())
    ]
    if missing:
        raise FileNotFoundError(
            f"{table.path}: {len(missing)} image files not found under {root}, e.g. {_some(missing, 3)}"
        )
    rows = list(zip(table.rows, table.lines))
    progress = tqdm(rows, desc=f"checking images of {table.path.name}", disable=len(rows) <= PROGRESS_FROM)
    bad = [(n, r[image_column], p) for r, n in progress if (p := image_problem(root / r[image_column])) is not None]
    if not bad:
        return
    listed = "; ".join(f"line {n}: {root / name} ({problem})" for n, name, problem in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    if not skip_bad_images:
        raise UnreadableImageError(
            f"{table.path}: {len(bad)} image file(s) cannot be read: {listed}{more}. "
            "Replace or remove them, or set skip_bad_images=true to skip and count them"
        )
    dropped = {n for n, _, _ in bad}
    kept = [(r, n) for r, n in rows if n not in dropped]
    table.rows, table.lines = [r for r, _ in kept], [n for _, n in kept]
    table.unlabelled_lines = [n for n in table.unlabelled_lines if n not in dropped]
    table.skipped = bad
    rank_zero_warn(f"{table.path}: skipped {len(bad)} unreadable image file(s) (skip_bad_images): {listed}{more}")


class CsvPairsDataset(Dataset):
    """Rows of a pairs CSV as samples ``{image, caption, label, domain, index}``.

    Args:
        table: the checked CSV.
        root: folder the image paths are relative to.
        image_column: column with the image path.
        caption_column: column with the caption.
        labels: class index of each row (-1: no class, retrieval only).
        domains: domain index of each row.
        transform: PIL image -> dict of views (None: the raw PIL image).
    """

    def __init__(
        self,
        table: PairsCsv,
        root: Path,
        image_column: str,
        caption_column: str,
        labels: list[int],
        domains: list[int],
        transform=None,
    ) -> None:
        self.table, self.root, self.transform = table, root, transform
        self.image_column, self.caption_column = image_column, caption_column
        self.labels, self.domains = labels, domains

    def __len__(self) -> int:
        return len(self.table.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.table.rows[index]
        path = self.root / row[self.image_column]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as err:  # a file changed after the check at set-up: name it
            raise UnreadableImageError(
                f"{self.table.path} line {self.table.lines[index]}: cannot decode image {path} "
                f"({type(err).__name__}: {err}); it was readable when the data was set up"
            ) from err
        return {
            **sample_views(self.transform, image, index),
            "caption": row[self.caption_column],
            "label": self.labels[index],
            "domain": self.domains[index],
            "index": index,
        }


class ImageTextDataModule(VisionLanguageDataModule):
    """Image-text pairs listed in CSV files, with optional class and domain columns.

    Each CSV has a header row and one row per pair: an image path (relative to ``root``), a
    caption, and optionally a class name and a domain. ShapesWorld's ``write_image_folder``
    writes exactly this layout. Zero-shot evaluation uses the class names and ``templates``;
    domains listed in ``ood_domains`` count as out-of-distribution, all others as
    in-distribution. A CSV without the class column holds pairs only (retrieval metrics,
    contrastive training). All files are checked when the datamodule is built, before any work.

    Args:
        root: folder the image paths are relative to.
        train_csv: training pairs.
        val_csv: validation pairs.
        test_csv: test pairs.
        image_column: column with the image path.
        caption_column: column with the caption.
        class_column: column with the class name (enables zero-shot evaluation).
        domain_column: column with the domain name.
        ood_domains: domain names treated as out-of-distribution.
        templates: zero-shot prompt templates with one ``{}``.
        classnames: the class list, in label order (default: the sorted class names found in the
            CSV files); a row whose class is not in it is an error naming its CSV line and class.
        unlabelled_rows: what to do with rows whose class cell is empty while the class column
            exists: ``error`` (default: the error lists their CSV lines) or ``retrieval_only``
            (keep them with label -1: used for retrieval and label-free losses, left out of every
            classification metric and label loss, and counted in the evaluation report).
        skip_bad_images: skip the rows whose image file cannot be decoded (and warn once with
            their count and lines) instead of stopping with an error naming them.
        batch_size: batch size.
        num_workers: data loader worker processes.
        augment: auto-augment policy of training images, applied before the student's and the
            teacher's transforms so both see the same image.
    """

    def __init__(
        self,
        root: str,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        image_column: str = "filepath",
        caption_column: str = "caption",
        class_column: str = "classname",
        domain_column: str = "domain",
        ood_domains: list[str] | None = None,
        templates: list[str] | None = None,
        classnames: list[str] | None = None,
        unlabelled_rows: UnlabelledRows = "error",
        skip_bad_images: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: AugmentPolicy = "none",
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        if unlabelled_rows not in ("error", "retrieval_only"):
            raise ValueError(f"unlabelled_rows must be 'error' or 'retrieval_only', got {unlabelled_rows!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root folder not found: {self.root}")
        self.csvs = {"train": train_csv, "val": val_csv, "test": test_csv}
        if not any(self.csvs.values()):
            raise ValueError("give at least one of train_csv, val_csv, test_csv")
        if classnames is not None and (not classnames or len(set(classnames)) != len(classnames)):
            raise ValueError(f"classnames must be a non-empty list of distinct names, got {classnames}")
        self.columns = dict(image_column=image_column, caption_column=caption_column)
        self.class_column, self.domain_column = class_column, domain_column
        self.unlabelled_rows, self.skip_bad_images = unlabelled_rows, skip_bad_images
        self.tables = {
            s: read_pairs_csv(
                p, self.root, **self.columns, class_column=class_column, domain_column=domain_column,
                unlabelled_rows=unlabelled_rows, skip_bad_images=skip_bad_images, classnames=classnames,
            )
            for s, p in self.csvs.items()
            if p
        }  # fmt: skip
        self.rows = {s: t.rows for s, t in self.tables.items()}
        all_rows = [r for rows in self.rows.values() for r in rows]
        found = sorted({r[class_column] for r in all_rows if (r.get(class_column) or "").strip()})
        self._classnames = list(classnames) if classnames is not None else found
        self._domain_names = sorted({r.get(domain_column) or "default" for r in all_rows})
        unknown = [d for d in ood_domains or [] if d not in self._domain_names]
        if unknown:
            raise ValueError(f"ood_domains {unknown} do not occur in the CSV files (domains: {self._domain_names})")
        self._ood_domains = list(ood_domains or [])
        self._templates = list(templates or DEFAULT_TEMPLATES)
        self.predict_split = "test" if test_csv else "val"
        self.datasets: dict[str, CsvPairsDataset] = {}
        self._report_unlabelled()

    def _report_unlabelled(self) -> None:
        for table in self.tables.values():
            if table.unlabelled_lines:
                rank_zero_info(
                    f"{table.path}: {_rows(len(table.unlabelled_lines))} without a {self.class_column!r} kept for "
                    f"retrieval only (unlabelled_rows=retrieval_only), on line(s) {_some(table.unlabelled_lines)}"
                )
            elif self._classnames and not table.has_class_column:
                rank_zero_warn(
                    f"{table.path} has no {self.class_column!r} column while other CSV files do: its "
                    f"{_rows(len(table.rows))} have no class and count for retrieval and label-free losses only"
                )

    @property
    def classnames(self) -> list[str]:
        """The ``classnames`` given, else the sorted class names found in the CSV files' class column."""
        return self._classnames

    @property
    def allows_unlabelled(self) -> bool:
        """Whether some rows have no class (label -1): ``unlabelled_rows=retrieval_only`` kept rows
        with an empty class cell, or a CSV without the class column sits beside ones with it."""
        return any(t.unlabelled_lines or not t.has_class_column for t in self.tables.values())

    @property
    def templates(self) -> list[str]:
        """Zero-shot prompt templates."""
        return self._templates

    @property
    def domain_names(self) -> list[str]:
        """Sorted domain names found in the CSV files (``default`` for rows without one)."""
        return self._domain_names

    @property
    def id_domains(self) -> list[str]:
        """Every domain not listed in ``ood_domains``."""
        return [d for d in self._domain_names if d not in self._ood_domains]

    @property
    def ood_domains(self) -> list[str]:
        """The domains named by ``ood_domains``."""
        return list(self._ood_domains)

    def split_dataset(self, split: str) -> CsvPairsDataset:
        """The pairs of ``split``'s CSV file."""
        if split not in self.tables:
            raise ValueError(f"no {split}_csv was given to ImageTextDataModule")
        if split not in self.datasets:
            label_of = {c: i for i, c in enumerate(self._classnames)}
            domain_of = {d: i for i, d in enumerate(self._domain_names)}
            rows = self.tables[split].rows
            self.datasets[split] = CsvPairsDataset(
                self.tables[split],
                self.root,
                labels=[label_of.get(r.get(self.class_column) or "", -1) for r in rows],
                domains=[domain_of.get(r.get(self.domain_column) or "default", 0) for r in rows],
                **self.columns,
            )
        return self.datasets[split]
