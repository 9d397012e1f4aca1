"""``--dataset``: task data from a Hugging Face dataset (save_to_disk folder, data files, hub id)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_peft.errors import TaskDataError
from hybrid_peft.tasks import get_task

datasets = pytest.importorskip("datasets")


def sst2_dict(path: Path, train_labels: list[int], eval_labels: list[int]) -> str:
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence": [f"train {i}" for i in range(len(train_labels))], "label": train_labels}
            ),
            "validation": datasets.Dataset.from_dict(
                {"sentence": [f"dev {i}" for i in range(len(eval_labels))], "label": eval_labels}
            ),
            "test": datasets.Dataset.from_dict({"sentence": ["unlabelled"], "label": [-1]}),
        }
    ).save_to_disk(str(path))
    return str(path)


def test_saved_dataset_feeds_a_glue_task(tmp_path: Path) -> None:
    source = sst2_dict(tmp_path / "sst2", [0, 1, 1], [1, 0])
    task = get_task("sst2", dataset=source)
    assert task.train_rows() == [
        {"text": "train 0", "text_pair": None, "label": 0},
        {"text": "train 1", "text_pair": None, "label": 1},
        {"text": "train 2", "text_pair": None, "label": 1},
    ]
    # validation is preferred to test (GLUE's hub test split is unlabelled)
    assert [r["text"] for r in task.eval_rows()] == ["dev 0", "dev 1"]


def test_sentence_pairs_and_string_labels_from_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    for split, rows in {
        "train": [
            {"sentence1": "a", "sentence2": "b", "label": "1"},
            {"sentence1": "c", "sentence2": "d", "label": "0"},
        ],
        "validation": [{"sentence1": "e", "sentence2": "f", "label": 1}],
    }.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("mrpc", dataset=str(folder))
    assert task.train_rows() == [
        {"text": "a", "text_pair": "b", "label": 1},  # label names ("0", "1") map to their class
        {"text": "c", "text_pair": "d", "label": 0},
    ]
    assert task.eval_rows() == [{"text": "e", "text_pair": "f", "label": 1}]


def test_gsm8k_from_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "gsm"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2", "extra": 1}) + "\n")
    (folder / "test.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
    task = get_task("gsm8k", dataset=str(folder))
    assert task.train_rows() == [{"question": "1+1?", "answer": "2\n#### 2"}]
    assert task.eval_rows() == [{"question": "2+2?", "answer": "#### 4"}]


@pytest.mark.parametrize(
    ("labels", "message"),
    [([0, 5], "outside 0..1"), ([0, -1], "unlabelled")],
)
def test_labels_outside_the_label_set(tmp_path: Path, labels: list[int], message: str) -> None:
    source = sst2_dict(tmp_path / "bad", labels, [0])
    with pytest.raises(TaskDataError, match=message):
        get_task("sst2", dataset=source).train_rows()


def test_bad_sources_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="no such dataset folder or data file"):
        get_task("sst2", dataset=str(tmp_path / "missing.jsonl")).train_rows()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TaskDataError, match="neither a saved dataset"):
        get_task("sst2", dataset=str(empty)).train_rows()
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text(json.dumps({"sentence": "x", "label": 0}) + "\n")
    with pytest.raises(TaskDataError, match="no evaluation split"):
        get_task("sst2", dataset=str(only_train)).train_rows()
    wrong = tmp_path / "wrong-columns"
    wrong.mkdir()
    for split in ("train", "validation"):
        (wrong / f"{split}.jsonl").write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(TaskDataError, match=r"no column\(s\) \['sentence'\]; its columns are \['label', 'text'\]"):
        get_task("sst2", dataset=str(wrong)).train_rows()
    with pytest.raises(TaskDataError, match="reads only its own files"):
        get_task("humaneval", dataset=str(wrong))


def test_hub_id_offline_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TaskDataError, match="could not be loaded.*network access"):
        get_task("gsm8k", dataset="no-such-owner/no-such-dataset:main").train_rows()


def test_training_recipe_reads_a_dataset(tiny_bert: str, tmp_path: Path) -> None:
    from hybrid_peft.run import TrainConfig, run_training

    source = sst2_dict(tmp_path / "sst2", [0, 1] * 8, [1, 0, 1])
    summary = run_training(
        TrainConfig(
            model=tiny_bert,
            task="sst2",
            dataset=source,
            steps=2,
            batch_size=4,
            max_length=16,
            output_dir=str(tmp_path / "run"),
            threads=2,
        ),
        progress=False,
    )
    assert summary.config.dataset == source
    assert set(summary.after) == {"accuracy", "f1", "mcc", "loss"}


def test_data_that_is_not_utf8_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "latin1"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.tsv").write_bytes("sentence\tlabel\ncafé bien\t1\nmal\t0\n".encode("latin-1"))
    with pytest.raises(TaskDataError, match="not UTF-8 text: convert it") as caught:
        get_task("sst2", dataset=str(folder)).train_rows()
    assert "\n" not in str(caught.value)
