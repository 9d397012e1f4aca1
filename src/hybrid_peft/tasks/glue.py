"""GLUE-format sentence(-pair) classification from TSV files: SST-2, MRPC, CoLA built in, any other by a spec
(``hybrid-peft train --task glue-spec:spec.json``; ``hybrid-peft train --help-spec`` lists every key)::

    {"name": "rte", "folder": "glue/RTE", "train_file": "train.tsv", "eval_file": "dev.tsv", "header": true,
     "text_columns": ["sentence1", "sentence2"], "label_column": "label", "labels": ["not_entailment", "entailment"]}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.errors import TaskDataError
from hybrid_peft.tasks.base import (
    classification_batch,
    classification_metrics,
    classify_rows,
)
from hybrid_peft.tasks.data import read_text, resolve_data_dir
from hybrid_peft.tasks.datasets_source import DatasetRows, require_columns
from hybrid_peft.tasks.registry import register_task

DEFAULT_LABELS = ("0", "1")


@dataclass(frozen=True)
class GlueSpec:
    """A GLUE-format task. Keys of a spec file (JSON):

    name                  the task's name in reports (required)
    folder                the folder holding the files, relative to the data folder (--data-dir) (required)
    text_columns          one or two columns holding the text (a sentence, or a sentence pair): names when the
                          files have a header line, 0-based positions when not (required)
    label_column          the column holding the label: a name, or a 0-based position without header (required)
    header                whether the files' first line names the columns (default true)
    labels                the label values as written in the files, in class order (default ["0", "1"]: give
                          them whenever the labels are anything else, e.g. ["negative", "positive"])
    train_file            the training file in folder (default "train.tsv")
    eval_file             the held-out file in folder (default "dev.tsv")
    metrics               reported metrics, from accuracy, f1, mcc (default all three)
    primary_metric        the one a benchmark ranks by (default "accuracy")
    dataset_text_columns  column names when the data comes from --dataset instead (default: text_columns)
    dataset_label_column  the label column name with --dataset (default "label")
    """

    name: str
    folder: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    header: bool = True
    labels: tuple[str, ...] = DEFAULT_LABELS
    train_file: str = "train.tsv"
    eval_file: str = "dev.tsv"
    metrics: tuple[str, ...] = field(default=("accuracy", "f1", "mcc"))
    primary_metric: str = "accuracy"  # what a benchmark ranks this task by; one of ``metrics``
    # Column names in a Hugging Face dataset given by --dataset (default: text_columns / "label")
    dataset_text_columns: tuple[str, ...] = ()
    dataset_label_column: str = "label"

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_columns", tuple(self.text_columns))
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        object.__setattr__(self, "dataset_text_columns", tuple(self.dataset_text_columns))
        if not 1 <= len(self.text_columns) <= 2:
            raise TaskDataError(f"{self.name}: text_columns must name one or two columns, got {self.text_columns}")
        if len(self.labels) < 2:
            raise TaskDataError(f"{self.name}: labels must list at least two classes, got {self.labels}")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not self.header:
            named = [c for c in (*self.text_columns, self.label_column) if not str(c).isdigit()]
            if named:
                raise TaskDataError(
                    f"{self.name}: with header: false the columns are numbered from 0, but text_columns/label_column "
                    f"name {named}; give their positions (e.g. text_columns: [3], label_column: 1), or set "
                    "header: true if the file's first line names the columns"
                )
        if self.primary_metric not in self.metrics:
            raise TaskDataError(f"{self.name}: primary_metric {self.primary_metric!r} is not one of {self.metrics}")


BUILTIN_SPECS = {
    "sst2": GlueSpec("sst2", "glue/SST-2", ("sentence",), "label"),
    "mrpc": GlueSpec(
        "mrpc",
        "glue/MRPC",
        ("#1 String", "#2 String"),
        "Quality",
        dataset_text_columns=("sentence1", "sentence2"),
        primary_metric="f1",
    ),
    "cola": GlueSpec(
        "cola", "glue/CoLA", (3,), 1, header=False, dataset_text_columns=("sentence",), primary_metric="mcc"
    ),
}


def _labels_hint(spec: GlueSpec) -> str:
    if spec.labels != DEFAULT_LABELS:
        return ""
    return (
        f"; the spec gives no 'labels', so they default to {list(DEFAULT_LABELS)}: add the file's label values to "
        'the spec in class order, e.g. "labels": ["negative", "positive"]'
    )


def glue_rows_from_records(source: str, records: list[dict[str, Any]], spec: GlueSpec) -> list[dict[str, Any]]:
    """Rows ``{"text", "text_pair", "label"}`` from dataset records: labels may be class indices or label names."""
    text_columns = spec.dataset_text_columns or tuple(str(c) for c in spec.text_columns)
    require_columns(source, records, (*text_columns, spec.dataset_label_column))
    label_index = {label: i for i, label in enumerate(spec.labels)}
    rows = []
    for number, record in enumerate(records):
        label = record[spec.dataset_label_column]
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise TaskDataError(f"{spec.name}: --dataset {source} record {number}: label {label!r} is not a class")
        if isinstance(label, int):
            if not 0 <= label < len(spec.labels):
                raise TaskDataError(
                    f"{spec.name}: --dataset {source} record {number}: label {label} is outside "
                    f"0..{len(spec.labels) - 1} (unlabelled test splits use -1; evaluate on a labelled split)"
                )
            index = label
        elif label in label_index:
            index = label_index[label]
        else:
            raise TaskDataError(
                f"{spec.name}: --dataset {source} record {number}: label {label!r} is not in the label set "
                f"{list(spec.labels)}{_labels_hint(spec)}"
            )
        texts = [str(record[c]) for c in text_columns]
        rows.append({"text": texts[0], "text_pair": texts[1] if len(texts) > 1 else None, "label": index})
    return rows


def read_glue_file(path: Path, spec: GlueSpec) -> list[dict[str, Any]]:
    """Rows ``{"text", "text_pair", "label"}`` of one TSV file, with errors that name the file and line."""
    if not path.is_file():
        raise TaskDataError(f"{spec.name}: {path} does not exist (expected a GLUE-format TSV file)")
    lines = read_text(path, spec.name).splitlines()  # MRPC starts with a byte-order mark: read_text drops it
    if spec.header:
        if not lines:
            raise TaskDataError(f"{spec.name}: {path} is empty")
        columns = lines[0].split("\t")
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in columns]
        if missing:
            raise TaskDataError(f"{spec.name}: {path} has no column(s) {missing}; its columns are {columns}")
        positions = [columns.index(c) for c in spec.text_columns]
        label_position = columns.index(spec.label_column)
        body, first_line = lines[1:], 2
    else:
        positions = [int(c) for c in spec.text_columns]
        label_position = int(spec.label_column)
        body, first_line = lines, 1
    label_index = {label: i for i, label in enumerate(spec.labels)}
    needed = max(*positions, label_position) + 1
    rows = []
    for number, line in enumerate(body, start=first_line):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < needed:
            raise TaskDataError(f"{spec.name}: {path}:{number} has {len(fields)} columns, needs at least {needed}")
        label = fields[label_position].strip()
        if label not in label_index:
            raise TaskDataError(
                f"{spec.name}: {path}:{number}: label {label!r} is not in the label set {list(spec.labels)}"
                f"{_labels_hint(spec)}"
            )
        texts = [fields[p].strip() for p in positions]
        rows.append({"text": texts[0], "text_pair": texts[1] if len(texts) > 1 else None, "label": label_index[label]})
    if not rows:
        raise TaskDataError(f"{spec.name}: {path} has no examples")
    return rows


def read_spec(path: str | os.PathLike) -> GlueSpec:
    """A :class:`GlueSpec` from a JSON file; unknown or missing keys are errors that list the valid ones."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TaskDataError(f"could not read the task spec {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TaskDataError(f"the task spec {path} must hold a JSON object of keys (see hybrid-peft train --help-spec)")
    fields = [f.name for f in dataclasses.fields(GlueSpec)]
    required = [f.name for f in dataclasses.fields(GlueSpec) if f.default is dataclasses.MISSING]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
        raise TaskDataError(
            f"the task spec {path} has unknown key(s) {unknown}{' (' + hints + ')' if hints else ''}; valid keys are "
            f"{fields} (hybrid-peft train --help-spec explains each)"
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise TaskDataError(f"the task spec {path} lacks {missing}; required keys are {required}")
    return GlueSpec(**data)


class GlueTask:
    model_task = "sequence-classification"

    def __init__(self, spec: GlueSpec, data_dir: str | os.PathLike | None = None, dataset: str | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.num_labels = len(spec.labels)
        self.primary_metric = spec.primary_metric
        self.data_folder = spec.folder
        self.folder = resolve_data_dir(data_dir) / spec.folder if dataset is None else None
        self.rows = (
            DatasetRows(dataset, lambda source, records: glue_rows_from_records(source, records, spec))
            if dataset is not None
            else None
        )

    @classmethod
    def from_spec_file(
        cls, path: str | os.PathLike, data_dir: str | os.PathLike | None = None, dataset: str | None = None
    ) -> GlueTask:
        return cls(read_spec(path), data_dir, dataset)

    def train_rows(self) -> list[dict[str, Any]]:
        if self.rows is not None:
            return self.rows.train
        return read_glue_file(self.folder / self.spec.train_file, self.spec)

    def eval_rows(self) -> list[dict[str, Any]]:
        if self.rows is not None:
            return self.rows.eval
        return read_glue_file(self.folder / self.spec.eval_file, self.spec)

    def batch(self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
        return classification_batch(tokenizer, rows, max_length)

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int = 32,
        max_length: int = 128,
        per_example: dict[str, list[float]] | None = None,
        **_: Any,
    ) -> dict[str, float]:
        predictions, loss = classify_rows(model, tokenizer, rows, batch_size, max_length, per_example)
        metrics = classification_metrics(predictions, [r["label"] for r in rows])
        return {**{k: metrics[k] for k in self.spec.metrics}, "loss": loss}


def _register(spec: GlueSpec) -> None:
    def factory(data_dir: str | os.PathLike | None = None, dataset: str | None = None) -> GlueTask:
        return GlueTask(spec, data_dir, dataset)

    factory.primary_metric = spec.primary_metric  # readable without building the task (bench tables)
    register_task(spec.name)(factory)


for _spec in BUILTIN_SPECS.values():
    _register(_spec)
