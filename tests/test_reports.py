"""What a person opens after a run: ``report.html`` (self-contained, rendered in headless Chromium without console
errors), experiment trackers (``--report-to tensorboard``, read back from the event files), the adapter telemetry
(the paper's checks) and the validation rows a sweep ranks rates on."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from hybrid_peft.errors import ConfigError
from hybrid_peft.run import TrainConfig, run_training
from hybrid_peft.run.recipe import hold_out
from hybrid_peft.telemetry import telemetry_summary

ARTIFACTS = Path(os.environ.get("HYBRID_PEFT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def train(model: str, output: Path, **options) -> None:  # noqa: ANN003
    base = {
        "model": model,
        "task": "humaneval",
        "method": "hybrid",
        "adapter": {"rank": 2, "block_size": 4},
        "steps": 4,
        "batch_size": 2,
        "max_length": 48,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        "eval_examples": 4,
        "eval_every": 2,
        "init_batches": 1,
        "generate": False,
        "output_dir": str(output),
        "threads": 2,
    }
    run_training(TrainConfig.from_dict(base | options), progress=False)


@pytest.fixture(scope="module")
def hybrid_run(tiny_lm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("hybrid-run")
    # the share rule, so that λ moves and its correlation with the gradient is defined (the default holds λ fixed)
    train(tiny_lm, output, report_to="tensorboard", adapter={"rank": 2, "block_size": 4, "rule": "share"})
    return output


def test_report_html_is_one_self_contained_page(hybrid_run: Path) -> None:
    page = (hybrid_run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "| loss |" not in page  # rendered, not raw
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)  # loss and λ
    assert not re.search(r'(src|href)="(https?:|//|file:)', page), "no external resource"
    assert "Adapter telemetry" in page and "Orthogonality" in page


def test_adapter_telemetry_records_the_papers_checks(hybrid_run: Path) -> None:
    records = [json.loads(line) for line in (hybrid_run / "adapter_telemetry.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(set(r["block_grad_norms"]) == {"0", "1"} for r in records)  # both blocks of the tiny Llama
    assert "orthogonality" in records[0]
    summary = telemetry_summary(hybrid_run)
    assert summary["depth_ratio"] > 0
    assert 0 <= summary["orthogonality_error"] < 1e-4  # Cayley blocks are orthogonal up to rounding
    assert -1 <= summary["lambda_gradient_spearman"] <= 1
    last = json.loads((hybrid_run / "mixing.jsonl").read_text().splitlines()[-1])["layers"]
    assert summary["final_lambda"] == pytest.approx(sum(r["lambda"] for r in last.values()) / len(last))


def test_block_gradient_norms_match_each_block_by_hand() -> None:
    """The batched per-block norms (one host read) against each block's gradients concatenated and normed in float64;
    frozen parameters, parameters without a gradient and parameters outside any block are left out."""
    import torch
    from torch import nn

    from hybrid_peft.telemetry import block_gradient_norms

    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(6, 5) for _ in range(3))
    model.head = nn.Linear(5, 2)
    model.layers[2].bias.requires_grad_(False)
    x = torch.randn(4, 6)
    loss = sum((layer(x) ** 2).sum() for layer in model.layers[:2]) + model.head(model.layers[2](x)).sum()
    loss.backward()
    model.layers[1].bias.grad = None  # no gradient: skipped
    wrapped = nn.Module()
    wrapped.model = model  # names as in a transformers model: "model.layers.3.weight"

    def by_hand(layer: nn.Linear) -> float:
        grads = [p.grad.double().flatten() for p in layer.parameters() if p.requires_grad and p.grad is not None]
        return float(torch.linalg.vector_norm(torch.cat(grads)))

    got = block_gradient_norms(wrapped)
    assert list(got) == [0, 1, 2]
    for block, layer in enumerate(model.layers):
        assert got[block] == pytest.approx(by_hand(layer), rel=1e-12)
    assert block_gradient_norms(nn.Linear(2, 2)) == {}


def test_tensorboard_events_hold_losses_rates_lambda_and_evaluations(hybrid_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((hybrid_run / "tracking").rglob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_s", "eval/loss"} <= tags
    assert any(tag.startswith("lambda/") for tag in tags)
    log = [json.loads(line) for line in (hybrid_run / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r and "eval" not in r]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


def test_a_tracker_whose_package_is_missing_is_named(tiny_lm: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package: pip install wandb"):
        train(tiny_lm, tmp_path / "out", report_to="wandb")
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(report_to="tensorbored")


def test_validation_rows_are_held_out_of_training_the_same_for_every_seed() -> None:
    rows = [{"text": str(i)} for i in range(100)]
    train_rows, validation = hold_out(rows, 10)
    assert len(train_rows) == 90 and len(validation) == 10
    assert not {r["text"] for r in train_rows} & {r["text"] for r in validation}
    assert hold_out(rows, 10) == (train_rows, validation)  # a fixed draw
    assert hold_out(rows, 0) == (rows, [])
    with pytest.raises(ConfigError, match="leaves no training rows"):
        hold_out(rows, 100)


def _browser():  # noqa: ANN202
    """A headless Chromium driven by Debian's chromedriver, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    driver_path = shutil.which("chromedriver")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if driver_path is None or browser_path is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1600",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def test_report_html_renders_in_headless_chromium_without_console_errors(hybrid_run: Path) -> None:
    browser = _browser()
    try:
        browser.get((hybrid_run / "report.html").resolve().as_uri())
        state = browser.execute_script(
            "return {tables: document.querySelectorAll('table').length,"
            " rows: document.querySelectorAll('table tr').length,"
            " images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),"
            " title: document.title};"
        )
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "run_report.png"))
    finally:
        browser.quit()
    assert errors == []
    assert state["tables"] >= 1 and state["rows"] >= 2 and "hybrid" in state["title"]  # header + held-out loss
    assert len(state["images"]) == 2 and all(
        done and width > 100 and height > 100 for done, width, height in state["images"]
    )
    assert (ARTIFACTS / "run_report.png").stat().st_size > 10_000
