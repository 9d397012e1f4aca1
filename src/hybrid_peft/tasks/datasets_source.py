"""Task data from a Hugging Face dataset instead of the task's own files: a hub id, a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or data files (JSON lines, CSV, Parquet).

    hybrid-peft train --task sst2 --dataset nyu-mll/glue:sst2        # hub id, ":" then the configuration
    hybrid-peft train --task gsm8k --dataset openai/gsm8k:main
    hybrid-peft train --task gsm8k --dataset data/my_gsm8k/          # save_to_disk folder, or train.jsonl + test.jsonl

Needs the optional ``datasets`` package (``pip install 'hybrid-peft[data]'``). The task decides which columns it
reads (GLUE tasks: the sentence column(s) and an integer or string ``label``; GSM8K: ``question`` and ``answer``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from hybrid_peft.errors import TaskDataError

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}
EVAL_SPLITS = ("validation", "test", "dev")


def _datasets_module() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise TaskDataError(
            "--dataset needs the 'datasets' package: pip install 'hybrid-peft[data]' (or pip install datasets)"
        ) from exc
    return datasets


def _local_data_files(folder: Path) -> dict[str, list[str]]:
    """``{split: [files]}`` for files named after a split (``train.jsonl``, ``validation.csv``, ``test.parquet``)."""
    files: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in DATA_FILE_BUILDERS and path.stem in ("train", *EVAL_SPLITS):
            files.setdefault(path.stem, []).append(str(path))
    return files


def load_splits(source: str) -> dict[str, list[dict[str, Any]]]:
    """Every split of ``source`` as a list of records (dicts)."""
    datasets = _datasets_module()
    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
        elif path.is_dir():
            files = _local_data_files(path)
            empty = sorted(f for names in files.values() for f in names if Path(f).stat().st_size == 0)
            if empty:
                raise TaskDataError(f"--dataset {source}: {empty[0]} is empty; every split file needs examples")
            if not files:
                raise TaskDataError(
                    f"--dataset {source}: the folder holds neither a saved dataset (save_to_disk) nor files named "
                    f"train/validation/test with a suffix in {sorted(DATA_FILE_BUILDERS)}"
                )
            builders = {DATA_FILE_BUILDERS[Path(f).suffix] for names in files.values() for f in names}
            if len(builders) > 1:
                raise TaskDataError(f"--dataset {source}: mixes file formats {sorted(builders)}; use one")
            builder = builders.pop()
            options = {"delimiter": "\t"} if any(f.endswith(".tsv") for fs in files.values() for f in fs) else {}
            # one split at a time: splits may differ in extra columns, which one schema for all would reject
            loaded = {
                split: datasets.load_dataset(builder, data_files={split: names}, split=split, **options)
                for split, names in files.items()
            }
        elif path.suffix in DATA_FILE_BUILDERS and path.is_file():
            if path.stat().st_size == 0:
                raise TaskDataError(f"--dataset {source}: the file is empty")
            options = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
            loaded = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files={"train": str(path)}, **options)
        elif path.exists() or source.startswith((".", "/")) or Path(source).suffix in DATA_FILE_BUILDERS:
            raise TaskDataError(f"--dataset {source}: no such dataset folder or data file")
        else:
            name, _, configuration = source.partition(":")
            loaded = datasets.load_dataset(name, configuration or None)
    except TaskDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (offline, missing config, bad file)
        hint = ""
        if not path.exists():
            hint = (
                " (a hub id needs network access or the dataset in the Hugging Face cache; HF_DATASETS_OFFLINE=1 "
                "and HF_HUB_OFFLINE=1 block downloads)"
            )
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        if isinstance(exc, UnicodeDecodeError) or isinstance(exc.__cause__, UnicodeDecodeError):
            hint = "; the data is not UTF-8 text: convert it (e.g. iconv -f latin1 -t utf-8)"
        raise TaskDataError(
            f"--dataset {source}: could not be loaded: {type(exc).__name__}: {exc}{cause}{hint}"
        ) from exc
    return {split: [dict(record) for record in loaded[split]] for split in loaded}


def train_and_eval_records(source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``train`` split and the first of ``validation`` / ``test`` / ``dev`` (GLUE's hub test labels are -1,
    so validation comes first)."""
    splits = load_splits(source)
    if "train" not in splits:
        raise TaskDataError(f"--dataset {source}: has no 'train' split (splits: {sorted(splits)})")
    eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
    if eval_split is None:
        raise TaskDataError(
            f"--dataset {source}: has no evaluation split; provide one named {' or '.join(EVAL_SPLITS)} "
            f"(splits: {sorted(splits)})"
        )
    for split in ("train", eval_split):
        if not splits[split]:
            raise TaskDataError(f"--dataset {source}: the {split!r} split is empty")
    return splits["train"], splits[eval_split]


def require_columns(source: str, records: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in records[0]]
    if missing:
        raise TaskDataError(f"--dataset {source}: no column(s) {missing}; its columns are {sorted(records[0])}")


class DatasetRows:
    """A task's train and held-out rows from ``--dataset``: loaded once, on first use, and converted to the task's
    row format by ``to_rows(source, records)`` (which checks the columns it needs)."""

    def __init__(self, source: str, to_rows: Callable[[str, list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        self.source, self.to_rows = source, to_rows

    @cached_property
    def _splits(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        train, held_out = train_and_eval_records(self.source)
        return self.to_rows(self.source, train), self.to_rows(self.source, held_out)

    @property
    def train(self) -> list[dict[str, Any]]:
        return self._splits[0]

    @property
    def eval(self) -> list[dict[str, Any]]:
        return self._splits[1]
