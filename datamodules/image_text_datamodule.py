"""Image-text pairs from CSV files: the path for a user's own data."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from distill.datamodules.base import VisionLanguageDataModule
from distill.datamodules.common import AugmentPolicy, sample_views

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]


def read_pairs_csv(path: str | Path, root: Path, image_column: str, caption_column: str) -> list[dict[str, str]]:
    """Read and check a CSV of image-text pairs; image paths resolve against ``root``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for column in (image_column, caption_column):
        if column not in rows[0]:
            raise KeyError(f"{path}: no column {column!r} (columns: {list(rows[0])})")
    missing = [r[image_column] for r in rows if not (root / r[image_column]).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} image files not found under {root}, e.g. {missing[0]}")
    return rows


class CsvPairsDataset(Dataset):
    """Rows of a pairs CSV as samples ``{image, caption, label, domain}``."""

    def __init__(
        self,
        rows: list[dict[str, str]],
        root: Path,
        image_column: str,
        caption_column: str,
        label_of: dict[str, int],
        domain_of: dict[str, int],
        label_column: str,
        domain_column: str,
        transform=None,
    ) -> None:
        self.rows, self.root, self.transform = rows, root, transform
        self.image_column, self.caption_column = image_column, caption_column
        self.label_of, self.domain_of = label_of, domain_of
        self.label_column, self.domain_column = label_column, domain_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        with Image.open(self.root / row[self.image_column]) as img:
            views = sample_views(self.transform, img.convert("RGB"))
        return {
            **views,
            "caption": row[self.caption_column],
            "label": self.label_of.get(row.get(self.label_column, ""), -1),
            "domain": self.domain_of.get(row.get(self.domain_column) or "default", 0),
            "index": index,
        }


class ImageTextDataModule(VisionLanguageDataModule):
    """Image-text pairs listed in CSV files, with optional class and domain columns.

    Each CSV has one row per pair: an image path (relative to ``root``), a caption, and
    optionally a class name and a domain. ShapesWorld's ``write_image_folder`` writes exactly
    this layout. Zero-shot evaluation uses the class names and ``templates``; domains listed in
    ``ood_domains`` count as out-of-distribution, all others as in-distribution.

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
        batch_size: int = 64,
        num_workers: int = 0,
        augment: AugmentPolicy = "none",
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root folder not found: {self.root}")
        self.csvs = {"train": train_csv, "val": val_csv, "test": test_csv}
        if not any(self.csvs.values()):
            raise ValueError("give at least one of train_csv, val_csv, test_csv")
        self.columns = dict(image_column=image_column, caption_column=caption_column)
        self.class_column, self.domain_column = class_column, domain_column
        self.rows = {s: read_pairs_csv(p, self.root, **self.columns) for s, p in self.csvs.items() if p}
        all_rows = [r for rows in self.rows.values() for r in rows]
        self._classnames = sorted({r[class_column] for r in all_rows if r.get(class_column)})
        self._domain_names = sorted({r.get(domain_column) or "default" for r in all_rows})
        unknown = [d for d in ood_domains or [] if d not in self._domain_names]
        if unknown:
            raise ValueError(f"ood_domains {unknown} do not occur in the CSV files (domains: {self._domain_names})")
        self._ood_domains = list(ood_domains or [])
        self._templates = list(templates or DEFAULT_TEMPLATES)
        self.predict_split = "test" if test_csv else "val"
        self.datasets: dict[str, CsvPairsDataset] = {}

    @property
    def classnames(self) -> list[str]:
        """Sorted class names found in the CSV files' class column."""
        return self._classnames

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
        if split not in self.rows:
            raise ValueError(f"no {split}_csv was given to ImageTextDataModule")
        if split not in self.datasets:
            self.datasets[split] = CsvPairsDataset(
                self.rows[split],
                self.root,
                label_of={c: i for i, c in enumerate(self._classnames)},
                domain_of={d: i for i, d in enumerate(self._domain_names)},
                label_column=self.class_column,
                domain_column=self.domain_column,
                **self.columns,
            )
        return self.datasets[split]
