"""``hybrid-peft bench``: the run matrix, one process per run, reuse of finished runs, failure rows, tables, plots."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from hybrid_peft.bench import BenchRow, aggregate, builtin_profiles, load_plan, run_bench, run_state
from hybrid_peft.cli import main
from hybrid_peft.errors import ConfigError, TaskDataError
from hybrid_peft.tasks import check_task_data


def write_config(path: Path, model: str, output: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(output),
                "seeds": [0, 1],
                "run_timeout_s": 300,
                "defaults": {"threads": 1, "generate": False, "eval_examples": 4, "max_length": 48},
                "tasks": {"he-tiny": {"task": "humaneval", "model": model, "steps": 3, "batch_size": 2}},
                "methods": {
                    "full-ft": {"method": "full", "learning_rate": 1e-3},  # any name: the method makes it the baseline
                    "lora": {"method": "lora", "adapter": {"rank": 2, "alpha": 4}, "learning_rate": 1e-2},
                    # diverges at once: a failed run must be recorded, not stop the bench
                    "broken": {"method": "lora", "learning_rate": 1e30, "tasks": {"he-tiny": {"max_grad_norm": 0.0}}},
                },
            },
            sort_keys=False,
        )
    )
    return path


@pytest.mark.slow
def test_bench_runs_the_matrix_and_reuses_finished_runs(
    tiny_lm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "bench.yaml", tiny_lm, tmp_path / "out")
    plan = load_plan(str(config))
    assert [(r.task, r.method, r.seed) for r in plan.runs()][:3] == [
        ("he-tiny", "full-ft", 0),
        ("he-tiny", "full-ft", 1),
        ("he-tiny", "lora", 0),
    ]
    lines: list[str] = []
    rows = run_bench(plan, echo=lines.append)
    reports = [line for line in lines if line.startswith("[")]  # one per run, after it
    headings = [line for line in lines if line.startswith("→ ")]  # one per run that trains, before its output
    assert len(rows) == 6 and len(reports) == 6
    assert headings[0] == "→ he-tiny · full-ft · seed 0 (run 1 of 6)" and len(headings) == 6
    assert lines.index(headings[1]) > lines.index(reports[0])
    # each run's output reaches the caller as it comes (indented), its progress lines included
    assert all(line.startswith("  ") for line in lines if not line.startswith(("[", "→ ")))
    assert any(line.startswith("  full: step 3/3 · loss ") and line.endswith(" left") for line in lines)
    status = {(r.method, r.seed): r.status for r in rows}
    assert status == {
        ("full-ft", 0): "ok",
        ("full-ft", 1): "ok",
        ("lora", 0): "ok",
        ("lora", 1): "ok",
        ("broken", 0): "failed",
        ("broken", 1): "failed",
    }
    broken = next(r for r in rows if r.method == "broken")
    assert "training loss is" in broken.error  # the run's own last message, not a traceback
    ok = [r for r in rows if r.status == "ok"]
    assert all(r.median_step_s > 0 and r.peak_rss_mb > 0 and r.held_out_loss > 0 for r in ok)
    assert all(r.finished_at and r.commit for r in ok)  # each row says when and from which source
    assert len(list((tmp_path / "out" / "before").glob("*.json"))) == 1  # one evaluation of the base model for all
    full = next(r for r in ok if r.method == "full-ft")
    lora = next(r for r in ok if r.method == "lora")
    assert full.trainable_parameters == full.total_parameters > lora.trainable_parameters > 0

    entries = {e["method"]: e for e in aggregate(rows)["he-tiny"]}
    assert entries["full-ft"]["time_x_full"] == pytest.approx(1.0)
    assert entries["lora"]["memory_x_full"] == pytest.approx(
        entries["lora"]["peak_rss_mb"][0] / entries["full-ft"]["peak_rss_mb"][0]
    )
    assert entries["broken"]["ok"] == 0 and entries["broken"]["metric"] is None

    out = tmp_path / "out"
    with open(out / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    table = (out / "results.md").read_text()
    assert "| full-ft |" in table and "| lora |" in table and "0/2" in table and "Failed: broken seed 0" in table
    assert " ± " in next(line for line in table.splitlines() if line.startswith("| lora |"))  # two seeds: a spread
    for plot in ("loss_he-tiny.png", "quality_vs_memory.png", "quality_vs_time.png"):
        assert (out / "plots" / plot).stat().st_size > 1000, plot

    # A second invocation reuses finished runs (no new process, same numbers) and retries failed ones.
    log = out / "runs" / "he-tiny" / "lora" / "seed-0" / "run.log"
    stamp = log.stat().st_mtime_ns
    import hybrid_peft.bench.running as bench_module

    writes: list[int] = []
    write_outputs = bench_module.write_outputs
    monkeypatch.setattr(bench_module, "write_outputs", lambda *a: writes.append(1) or write_outputs(*a))
    again = run_bench(plan, methods=["lora"], echo=lambda _: None)
    assert log.stat().st_mtime_ns == stamp
    assert len(writes) == 1  # reused runs: the tables and plots are written once, not after each run
    assert [r.median_step_s for r in again] == [r.median_step_s for r in rows if r.method == "lora"]
    # A part (one method, one seed) still reports every finished run of the config.
    part = run_bench(plan, methods=["lora"], seeds=[1], echo=lambda _: None)
    assert [(r.method, r.seed) for r in part] == [("lora", 1)]
    with open(out / "results.csv", newline="") as handle:
        reported = {(r["method"], r["seed"]) for r in csv.DictReader(handle)}
    assert reported == {("full-ft", "0"), ("full-ft", "1"), ("lora", "0"), ("lora", "1")}
    # What the command prints at the end: every finished run of the config, paired to LoRA.
    from hybrid_peft.bench.running import bench_rows
    from hybrid_peft.bench.tables import terminal_summary

    summary = terminal_summary(plan, bench_rows(plan)).splitlines()
    assert summary[0] == "he-tiny:" and "Δ vs lora (seeds)" in summary[1] and "forgetting" in summary[1]
    full_line = next(line for line in summary if line.strip().startswith("full-ft"))
    assert re.search(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", full_line)  # 2 seeds: an interval
    assert "both exclude 0" in summary[-1]


@pytest.mark.slow
def test_bench_reruns_runs_whose_options_changed(tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A finished run answers only for the options it ran with: spelling out an adapter default keeps it, changing
    the task's steps makes it stale (left out of the tables, run again when selected)."""
    path = write_config(tmp_path / "bench.yaml", tiny_lm, tmp_path / "out")
    run_bench(load_plan(str(path)), methods=["full-ft", "lora"], seeds=[0], echo=lambda _: None)
    log = tmp_path / "out" / "runs" / "he-tiny" / "lora" / "seed-0" / "run.log"
    stamp = log.stat().st_mtime_ns

    config = yaml.safe_load(path.read_text())
    config["methods"]["lora"]["adapter"]["dropout"] = 0.0  # LoRA's default, written out: the same training
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    lines: list[str] = []
    run_bench(load_plan(str(path)), methods=["lora"], seeds=[0], echo=lines.append)
    assert log.stat().st_mtime_ns == stamp and not any("other options" in line for line in lines)

    # The run recorded its adapter options as resolved when it ran; a default changed since does not apply to it.
    summary_path = log.parent / "summary.json"
    recorded = summary_path.read_text()
    resolved = json.loads(recorded)["resolved_adapters"]
    assert resolved[0]["rank"] == 2 and resolved[0]["dropout"] == 0.0 and resolved[0]["targets"]
    lora_run = next(r for r in load_plan(str(path)).runs(methods=["lora"], seeds=[0]))
    assert run_state(lora_run) == "finished"
    summary_path.write_text(recorded.replace('"dropout": 0.0', '"dropout": 0.1'))  # as if 0.1 had been the default
    assert run_state(lora_run) == "stale"
    # A field added since the run (recorded without it) takes its default, which keeps the old behaviour: reused;
    # the config asking for another value of it makes the run stale.
    older = json.loads(recorded)
    del older["resolved_adapters"][0]["loraplus_lr_ratio"]
    summary_path.write_text(json.dumps(older))
    assert run_state(lora_run) == "finished"
    config["methods"]["lora"]["adapter"]["loraplus_lr_ratio"] = 16.0
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert run_state(next(iter(load_plan(str(path)).runs(methods=["lora"], seeds=[0])))) == "stale"
    del config["methods"]["lora"]["adapter"]["loraplus_lr_ratio"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # A run from before runs recorded their options: the options its saved adapter was trained with decide.
    unrecorded = json.loads(recorded)
    del unrecorded["resolved_adapters"]
    summary_path.write_text(json.dumps(unrecorded))
    assert run_state(lora_run) == "finished"
    adapter_config = log.parent / "adapter" / "adapter_config.json"
    saved = adapter_config.read_text()
    adapter_config.write_text(saved.replace('"dropout": 0.0', '"dropout": 0.1'))  # trained with another dropout
    assert run_state(lora_run) == "stale"
    adapter_config.write_text(saved)
    summary_path.write_text(recorded)

    config["tasks"]["he-tiny"]["steps"] = 4
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    capsys.readouterr()
    assert main(["bench", str(path), "--seeds", "0", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "lora · seed 0: finished with other options, runs again" in listed and "broken · seed 0: to run" in listed
    lines.clear()
    rows = run_bench(load_plan(str(path)), methods=["lora"], seeds=[0], echo=lines.append)
    assert "2 finished run(s) used other options" in lines[0] and "the 1 selected now run again" in lines[0]
    assert log.stat().st_mtime_ns != stamp and rows[0].status == "ok"
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        reported = {(r["method"], r["seed"]) for r in csv.DictReader(handle)}
    assert reported == {("lora", "0")}  # full-ft seed 0 ran 3 steps: no longer reported
    lora_row = next(line for line in (tmp_path / "out" / "results.md").read_text().splitlines() if "| lora |" in line)
    assert "±" not in lora_row and lora_row.endswith("| 1/1 |")  # one seed: a value, not "± 0"


@pytest.mark.slow
def test_bench_records_carry_finished_runs_to_another_output(
    tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--records DIR`` writes each finished run's record (summary and logs, no weights) as soon as it finishes and,
    given to a bench with an empty output, makes those runs finished there: reused, not trained again, with the same
    numbers."""
    from hybrid_peft.bench import running

    records = tmp_path / "records"
    first = write_config(tmp_path / "first.yaml", tiny_lm, tmp_path / "first")
    recorded_before: list[tuple[str, bool]] = []  # (the run about to train, full-ft's record already written?)

    def spy(run, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        recorded_before.append((run.method, (records / "he-tiny" / "full-ft" / "seed-0" / "summary.json").is_file()))
        return execute(run, *args, **kwargs)

    execute = running.execute
    monkeypatch.setattr(running, "execute", spy)
    assert main(["bench", str(first), "--methods", "full-ft,lora", "--seeds", "0", "--records", str(records)]) == 0
    assert recorded_before == [("full-ft", False), ("lora", True)]  # not only at the end: an interrupt keeps it
    assert "2 run record(s) written to" in capsys.readouterr().out
    recorded = records / "he-tiny" / "lora" / "seed-0"
    assert (recorded / "summary.json").is_file() and (recorded / "train_log.jsonl").is_file()
    assert not (recorded / "adapter").exists() and not any(p.suffix in (".png", ".html") for p in recorded.iterdir())

    second = write_config(tmp_path / "second.yaml", tiny_lm, tmp_path / "second")
    assert main(["bench", str(second), "--methods", "full-ft,lora", "--seeds", "0", "--dry-run", "--records",
                 str(records)]) == 0  # fmt: skip
    listed = capsys.readouterr().out
    assert "2 run record(s) copied from" in listed and listed.count("finished, reused") == 2
    assert main(["bench", str(second), "--methods", "full-ft,lora", "--seeds", "0", "--records", str(records)]) == 0
    out = capsys.readouterr().out
    assert "→" not in out and "0 run record(s) written to" in out  # nothing trained, the records unchanged
    assert not (tmp_path / "second" / "runs" / "he-tiny" / "lora" / "seed-0" / "run.log").exists()
    with open(tmp_path / "first" / "results.csv", newline="") as a, open(tmp_path / "second" / "results.csv") as b:
        first_rows, second_rows = list(csv.DictReader(a)), list(csv.DictReader(b))
    keys = ("method", "seed", "held_out_loss", "median_step_s", "forgetting")
    assert [[r[k] for k in keys] for r in second_rows] == [[r[k] for k in keys] for r in first_rows]


def test_records_copy_only_what_a_finished_run_lacks(tmp_path: Path) -> None:
    """Importing leaves a run that finished in the output as it is, replaces an unfinished run's logs (none of them
    left beside the record's summary) and copies nothing else; exporting is idempotent."""
    from hybrid_peft.bench.records import export_records, import_records, recorded_runs

    records, runs = tmp_path / "records", tmp_path / "runs"
    for seed in (0, 1, 2):
        folder = records / "task" / "lora" / f"seed-{seed}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(f'{{"recorded": {seed}}}')
        (folder / "train_log.jsonl").write_text("{}\n")
        (folder / "adapter").mkdir()  # weights are never part of a record
    finished, unfinished = runs / "task" / "lora" / "seed-0", runs / "task" / "lora" / "seed-1"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text('{"ran": "here"}')
    unfinished.mkdir(parents=True)
    (unfinished / "mixing.jsonl").write_text("torn")
    (unfinished / "train_log.jsonl").write_text("partial")

    assert import_records(records, runs) == 2
    assert (finished / "summary.json").read_text() == '{"ran": "here"}'
    assert (unfinished / "summary.json").read_text() == '{"recorded": 1}'
    assert (unfinished / "train_log.jsonl").read_text() == "{}\n" and not (unfinished / "mixing.jsonl").exists()
    assert not (runs / "task" / "lora" / "seed-2" / "adapter").exists()
    assert import_records(records, runs) == 0 and import_records(tmp_path / "absent", runs) == 0
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="is a file; give a folder of run records"):
        import_records(tmp_path / "a-file", runs)

    exported = tmp_path / "exported"
    assert export_records(runs, exported) == 3 and export_records(runs, exported) == 0
    assert [str(p) for p in recorded_runs(exported)] == [f"task/lora/seed-{seed}" for seed in (0, 1, 2)]
    assert sorted(p.name for p in (exported / "task" / "lora" / "seed-0").iterdir()) == ["summary.json"]


def test_exported_records_name_no_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench run into an absolute ``--output-dir`` writes its records with the run folder made relative (to the
    working directory below which it lies, else the run's place in the layout); relative folders, summaries without
    one and unreadable ones are copied unchanged."""
    from hybrid_peft.bench.records import export_records

    work = tmp_path / "work"
    runs = work / "out" / "runs"
    summaries = {
        "below": {
            "config": {
                "output_dir": str(runs / "t" / "below"),
                "before_cache": str(work / "out" / "before"),
                "seed": 0,
            },
            "after": {"loss": 0.5},
        },
        "elsewhere": {"config": {"output_dir": "/somewhere/else/t/elsewhere", "before_cache": "/somewhere/before"}},
        "relative": {"config": {"output_dir": "runs/x/t/relative"}},
        "bare": {"recorded": 1},
    }
    for name, summary in summaries.items():
        (runs / "t" / name).mkdir(parents=True)
        (runs / "t" / name / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (runs / "t" / "torn").mkdir()
    (runs / "t" / "torn" / "summary.json").write_text('{"config": ')
    monkeypatch.chdir(work)
    records = tmp_path / "records"
    assert export_records(runs, records) == 5 and export_records(runs, records) == 0  # still idempotent

    def folder(name: str, key: str = "output_dir") -> str:
        return json.loads((records / "t" / name / "summary.json").read_text())["config"][key]

    assert folder("below") == "out/runs/t/below" and folder("elsewhere") == "t/elsewhere"
    assert folder("below", "before_cache") == "out/before" and folder("elsewhere", "before_cache") == "before"
    assert folder("relative") == "runs/x/t/relative"
    below = json.loads((records / "t" / "below" / "summary.json").read_text())
    assert below["after"] == {"loss": 0.5} and below["config"]["seed"] == 0  # nothing else changes
    assert (records / "t" / "bare" / "summary.json").read_text() == (runs / "t" / "bare" / "summary.json").read_text()
    assert (records / "t" / "torn" / "summary.json").read_text() == '{"config": '
    assert str(tmp_path) not in "".join(p.read_text() for p in records.rglob("summary.json"))


def test_bench_runs_share_the_base_models_evaluation_and_where_it_is_kept_decides_nothing(
    tiny_lm: str, tmp_path: Path
) -> None:
    from hybrid_peft.bench.running import _comparable

    plan = load_plan(str(write_config(tmp_path / "bench.yaml", tiny_lm, tmp_path / "out")))
    assert {r.config.before_cache for r in plan.runs()} == {str(tmp_path / "out" / "before")}
    config = plan.runs()[0].config
    assert _comparable(dataclasses.replace(config, before_cache=None)) == _comparable(config)  # runs from before it
    assert (
        load_plan(str(tmp_path / "bench.yaml"), overrides={"before_cache": None}).runs()[0].config.before_cache is None
    )


def test_bench_configs_fail_early_and_clearly(tmp_path: Path, tiny_lm: str, capsys: pytest.CaptureFixture) -> None:
    assert {"quick", "full"} <= set(builtin_profiles())
    for name in builtin_profiles():  # the shipped profiles validate (every run's options)
        plan = load_plan(name)
        assert plan.sweep_runs() if plan.sweep else plan.runs()
    assert "hybrid" in load_plan("full").methods and "hybrid" in load_plan("quick").methods  # the default hybrid
    larger = load_plan("math", overrides={"model": "meta-llama/Llama-3.2-3B", "dtype": "bfloat16"})  # on a GPU
    assert {(r.config.model, r.config.dtype) for r in larger.sweep_runs()} == {("meta-llama/Llama-3.2-3B", "bfloat16")}
    assert {r.config.model for r in load_plan("math").sweep_runs()} == {"smollm2-135m"}
    for path in sorted((Path(__file__).parents[1] / "benchmarks").glob("*.yaml")):  # and the benchmark scripts'
        plan = load_plan(str(path))
        assert plan.sweep_runs() if plan.sweep else plan.runs(), path.name
    config = write_config(tmp_path / "bench.yaml", tiny_lm, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['nope'\]"):
        load_plan(str(config)).runs(methods=["nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": {"t": {"task": "sst2"}}, "methods": {"m": {"method": "lora", "stepz": 3}}}))
    with pytest.raises(ConfigError, match=r"task t, method m: unknown training option\(s\) \['stepz'\]"):
        load_plan(str(bad))
    referenced = tmp_path / "referenced.yaml"
    methods = {"lora": {"method": "lora"}, "hybrid": {"method": "hybrid"}}
    referenced.write_text(yaml.safe_dump({"tasks": {"t": {"task": "sst2"}}, "methods": methods}))
    assert load_plan(str(referenced)).references == ("lora",)  # the default: LoRA
    for references, message in ((["lora", "boft"], r"references \['boft'\] are not methods"), ([], "list of method")):
        referenced.write_text(
            yaml.safe_dump({"tasks": {"t": {"task": "sst2"}}, "methods": methods, "references": references})
        )
        with pytest.raises(ConfigError, match=message):
            load_plan(str(referenced))
    assert main(["bench", "no-such-profile"]) == 2
    assert "neither a built-in profile" in capsys.readouterr().err
    assert main(["bench", str(config), "--dry-run", "--seeds", "3"]) == 0
    assert "he-tiny · lora · seed 3" in capsys.readouterr().out


def test_bench_stops_before_its_first_run_when_a_task_has_no_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A task whose files are not there fails the bench once, before anything trains (not every run in turn)."""
    config = tmp_path / "bench.yaml"
    tasks = {"math": {"task": "gsm8k", "model": "smollm2-135m", "steps": 2}, "code": {"task": "humaneval"}}
    methods = {"lora": {"method": "lora"}}
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "tasks": tasks, "methods": methods}))
    monkeypatch.chdir(tmp_path)  # no shared/data above
    monkeypatch.delenv("HYBRID_PEFT_DATA", raising=False)
    assert main(["bench", str(config)]) == 2
    assert "no data folder: pass --data-dir" in capsys.readouterr().err
    monkeypatch.setenv("HYBRID_PEFT_DATA", str(tmp_path / "data"))
    (tmp_path / "data" / "glue").mkdir(parents=True)  # a data folder, without gsm8k/
    with pytest.raises(TaskDataError, match=r"task 'gsm8k' reads gsm8k/ in the data folder, and .* is not a folder"):
        run_bench(load_plan(str(config)), echo=lambda line: None)
    assert not (tmp_path / "out" / "runs").exists()
    check_task_data("humaneval")  # a packaged task needs no data folder


def test_sweep_factors_replace_the_configs_to_rerun_a_chosen_point(
    tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--sweep-factors 3`` keeps the sweep's seed and validation rows but runs only that factor of each rate, so a
    bench can rerun the point an earlier, full sweep chose (its folders are the full sweep's, so records match)."""
    path = write_config(tmp_path / "bench.yaml", tiny_lm, tmp_path / "out")
    config = yaml.safe_load(path.read_text())
    config["sweep"] = {"factors": [0.3, 1, 3], "seed": 0, "validation_examples": 6, "select": "loss"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    full = {(r.method, r.config.learning_rate): r.folder for r in load_plan(str(path)).sweep_runs()}
    narrowed = load_plan(str(path), sweep_factors=[3])
    assert narrowed.sweep is not None and narrowed.sweep.factors == (3.0,) and narrowed.sweep.validation_examples == 6
    runs = narrowed.sweep_runs(methods=["lora"])
    assert [r.config.learning_rate for r in runs] == [3e-2]  # lora's 1e-2 × 3
    assert runs[0].folder == full["lora", 3e-2] and runs[0].config.validation_examples == 6
    assert main(["bench", str(path), "--methods", "lora", "--sweep-factors", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a sweep of 1 rate each on seed 0" in out and "lora · lr 0.03 · seed 0: to run" in out
    assert main(["bench", str(path), "--sweep-factors", "3,x", "--dry-run"]) == 2
    assert "--sweep-factors takes comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="sweep factors must be distinct and positive"):
        load_plan(str(path), sweep_factors=[0])
    del config["sweep"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ConfigError, match="has no sweep"):
        load_plan(str(path), sweep_factors=[3])


def test_sweep_factors_for_some_methods_leave_the_others_ranked_on_the_configs(
    tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--methods lora --sweep-factors 1,1.5,3`` adds a candidate for LoRA only: every other method (say, one that
    records brought into the output) is still ranked on the config's factors, so its chosen rate stays the one its
    full sweep chose, not the best of the factors given for another method."""
    from hybrid_peft.bench import chosen_rates
    from hybrid_peft.bench.tables import sweep_table

    path = write_config(tmp_path / "bench.yaml", tiny_lm, tmp_path / "out")
    config = yaml.safe_load(path.read_text())
    config["sweep"] = {"factors": [0.3, 1, 3], "seed": 0, "validation_examples": 6, "select": "loss"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    plan = load_plan(str(path), sweep_factors=[1, 1.5, 3], sweep_methods=["lora"])
    assert plan.factors("lora") == (1.0, 1.5, 3.0) and plan.factors("full-ft") == (0.3, 1.0, 3.0)
    rates = {(r.method, r.config.learning_rate) for r in plan.sweep_runs()}
    assert {rate for method, rate in rates if method == "lora"} == {1e-2, 1.5e-2, 3e-2}
    assert {rate for method, rate in rates if method == "full-ft"} == {3e-4, 1e-3, 3e-3}

    def row(method: str, rate: float, loss: float) -> BenchRow:
        return BenchRow("he-tiny", method, 0, "ok", method, "m", "humaneval", "pass@1", rate, validation_loss=loss)

    # full fine-tuning's full sweep chose ×0.3; ranked on LoRA's factors it would have been given ×3
    full = [row("full-ft", 3e-4, 0.40), row("full-ft", 1e-3, 0.60), row("full-ft", 3e-3, 0.50)]
    lora = [row("lora", 1e-2, 0.70), row("lora", 1.5e-2, 0.65), row("lora", 3e-2, 0.68)]
    assert chosen_rates(plan, full + lora) == {("he-tiny", "full-ft"): 3e-4, ("he-tiny", "lora"): 1.5e-2}
    assert ("he-tiny", "lora") not in chosen_rates(plan, full + lora[:2])  # LoRA's new candidate not run yet
    assert "rate × 0.3, 1, 3 (lora: × 1, 1.5, 3)" in "\n".join(sweep_table(plan, full + lora))
    assert main(["bench", str(path), "--methods", "lora", "--sweep-factors", "1,1.5,3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a sweep of 3 rates each" in out and "lora · lr 0.015 · seed 0: to run" in out and "full-ft" not in out
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['lorra'\]"):
        load_plan(str(path), sweep_factors=[3], sweep_methods=["lorra"])


def test_sweep_table_names_the_held_out_rows_each_task_validated_on(tmp_path: Path) -> None:
    """A task may hold out its own count of training rows over the sweep's (``validation_examples`` in its options):
    the sweep table says, per task, on how many rows its rates were ranked, not the sweep's default."""
    from hybrid_peft.bench import BenchPlan, Sweep
    from hybrid_peft.bench.tables import sweep_table

    sweep = Sweep(factors=(1.0, 3.0), seed=0, validation_examples=64, select="loss")
    plan = BenchPlan("b", tmp_path, (0,), tasks={}, methods={}, sweep=sweep)

    def row(task: str, rate: float, loss: float, held_out: int) -> BenchRow:
        return BenchRow(task, "lora", 0, "ok", "lora", "m", "sst2", "accuracy", rate, validation_loss=loss,
                        validation_examples=held_out)  # fmt: skip

    rows = [row("own", 1e-3, 0.4, 256), row("own", 3e-3, 0.5, 256), row("default", 1e-3, 0.6, 64),
            row("default", 3e-3, 0.5, 64)]  # fmt: skip
    text = "\n".join(sweep_table(plan, rows))
    own, default = text.split("### own")[1].split("### default")
    assert "Validated on 256 held-out training rows." in own and "64" not in own
    assert "Validated on 64 held-out training rows." in default
    assert "**0.001: – (0.4000)**" in own and "**0.003: – (0.5000)**" in default  # each task's own choice


@pytest.mark.slow
def test_bench_sweeps_rates_on_validation_rows_then_runs_the_chosen_rate_on_every_seed(
    tiny_lm: str, tmp_path: Path
) -> None:
    """With ``sweep``, each method runs at its rate × each factor on the sweep seed, is ranked on rows held out of
    the training data, and only the chosen rate runs on the other seeds; the tables report the chosen rate."""
    path = write_config(tmp_path / "bench.yaml", tiny_lm, tmp_path / "out")
    config = yaml.safe_load(path.read_text())
    config["sweep"] = {"factors": [0.1, 1.0], "seed": 0, "validation_examples": 6, "select": "loss"}
    del config["methods"]["broken"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    plan = load_plan(str(path))
    assert [(r.method, r.config.learning_rate) for r in plan.sweep_runs()] == [
        ("full-ft", 1e-4),
        ("full-ft", 1e-3),
        ("lora", 1e-3),
        ("lora", 1e-2),
    ]
    assert all(r.config.validation_examples == 6 for r in plan.sweep_runs())
    assert plan.runs() == []  # nothing is chosen before the sweep has run
    lines: list[str] = []
    rows = run_bench(plan, echo=lines.append)
    assert len(rows) == 6  # 4 sweep runs, then seed 1 at each chosen rate
    reports = [line for line in lines if line.startswith("[")]
    assert reports[0].startswith("[1/6]") and "lr 0.0001" in reports[0] and any("left" in line for line in reports)
    out = tmp_path / "out"
    with open(out / "sweep.csv", newline="") as handle:
        sweep = list(csv.DictReader(handle))  # the CSV's rows: dicts of strings
    assert len(sweep) == 4 and all(float(r["validation_loss"]) > 0 for r in sweep)
    for method in ("full-ft", "lora"):
        candidates = [r for r in sweep if r["method"] == method]
        best = min(candidates, key=lambda r: float(r["validation_loss"]))["learning_rate"]
        assert any(f"{method}: learning rate {float(best):g} chosen" in line for line in lines)
        with open(out / "results.csv", newline="") as handle:
            results = [r for r in csv.DictReader(handle) if r["method"] == method]
        assert sorted(r["seed"] for r in results) == ["0", "1"]
        assert {r["learning_rate"] for r in results} == {best}  # the reported runs are the chosen rate's
    table = (out / "results.md").read_text()
    assert "## Learning-rate sweep" in table
    assert len(re.findall(r"\*\*[0-9.e-]+: ", table)) == 2  # one bold (chosen) cell per method
    # held-out validation rows are not trained on: the run's training set is smaller by exactly that many
    summary = json.loads((Path(rows[0].folder) / "summary.json").read_text())
    assert summary["config"]["validation_examples"] == 6 and set(summary["validation"]) >= {"loss"}


def test_time_to_quality_reads_the_periodic_evaluations(tmp_path: Path) -> None:
    from hybrid_peft.bench import time_to_quality, time_to_quality_lines
    from hybrid_peft.telemetry import spearman

    def run(method: str, seed: int, losses: list[float], step_seconds: float, recipe: str) -> BenchRow:
        folder = tmp_path / method / str(seed)
        folder.mkdir(parents=True)
        records = [{"step": 0, "eval": {"loss": 1.0}}]
        records += [
            {"step": 10 * (i + 1), "eval": {"loss": loss}, "train_seconds": 10 * (i + 1) * step_seconds}
            for i, loss in enumerate(losses)
        ]
        (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return BenchRow(
            task="t", method=method, seed=seed, status="ok", folder=str(folder), model="m", base_task="b",
            metric_name="accuracy", recipe_method=recipe, metric=0.5, held_out_loss=losses[-1], learning_rate=1e-3,
        )  # fmt: skip

    rows = [
        run("full", 0, [0.8, 0.6, 0.5], 2.0, "full"),
        run("full", 1, [0.8, 0.6, 0.5], 2.0, "full"),
        run("full", 2, [0.8, 0.6, 0.5], 2.0, "full"),
        run("lora", 0, [0.7, 0.5, 0.45], 1.0, "lora"),  # reaches full's 0.5 at step 20, in 20 s
        run("lora", 1, [0.6, 0.5, 0.45], 1.0, "lora"),
        run("lora", 2, [0.6, 0.5, 0.45], 1.0, "lora"),
        run("slow", 0, [0.9, 0.8, 0.7], 1.0, "lora"),  # never does
        run("slow", 1, [0.9, 0.8, 0.7], 1.0, "lora"),
        run("mixed", 0, [0.4, 0.5, 0.5], 1.0, "lora"),  # reaches 0.5 (and 0.45) at step 10 ...
        run("mixed", 1, [0.7, 0.5, 0.5], 1.0, "lora"),  # ... at 20 ...
        run("mixed", 2, [0.9, 0.8, 0.6], 1.0, "lora"),  # ... never: the median is 20 steps, in 2 seeds of 3
        run("lucky", 0, [0.3, 0.3, 0.3], 1.0, "lora"),  # lowest loss, but one seed: not the "best" target
    ]
    table = time_to_quality(rows)["t"]
    assert table["targets"]["full"] == ("full", 0.5) and table["targets"]["best"] == ("lora", 0.45)
    assert table["methods"]["full"]["reached"]["full"] == (30, 60.0, 3, 3)
    assert table["full_run_seconds"] == 60.0  # full fine-tuning's whole run: the training seconds at its last step
    assert table["methods"]["lora"]["reached"]["full"] == (20, 20.0, 3, 3)
    assert table["methods"]["lora"]["reached"]["best"] == (30, 30.0, 3, 3)
    assert table["methods"]["slow"]["reached"]["full"] is None
    assert table["methods"]["mixed"]["reached"]["full"] == (20, 20.0, 2, 3)
    assert table["methods"]["mixed"]["reached"]["best"] is None  # one seed of three reached 0.45: not the median
    lines = time_to_quality_lines(rows)
    assert "| lora | 20 steps, 20.0 s, 0.33× full run (3/3) | 30 steps, 30.0 s, 0.50× full run (3/3) |" in lines
    assert "| slow | – | – |" in lines and "| mixed | 20 steps, 20.0 s, 0.33× full run (2/3) | – |" in lines
    final_only = [run("once", seed, [0.3], 1.0, "lora") for seed in range(3)]  # evaluated at the end alone
    assert "once" not in time_to_quality(rows + final_only)["t"]["methods"]
    assert time_to_quality_lines(final_only) == []  # no table of "80 steps" everywhere for a bench without eval_every
    full_best = time_to_quality([r for r in rows if r.method in ("full", "slow")])["t"]
    assert full_best["targets"] == {"full": ("full", 0.5)}  # full fine-tuning is the best: one target, one column
    without_full = [r for r in rows if r.method != "full"]
    assert time_to_quality(without_full)["t"]["full_run_seconds"] is None  # no full fine-tuning run to divide by
    assert not any("× full run" in line for line in time_to_quality_lines(without_full))  # nor its explanation
    assert any("**× full run**" in line for line in lines)  # explained where the cells carry it
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([0.5, 0.5, 0.5], [1, 2, 3]) is None  # λ held fixed: no correlation to report, not a spurious one
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))  # ties share rank 0.5


def test_checks_table_reports_lambda_at_the_end_per_method(tmp_path: Path) -> None:
    """The paper's checks table: λ at the end is the seed median of each run's last-step mean over layers; a method
    without a mix (LoRA) shows a dash there."""
    from hybrid_peft.bench import telemetry_lines

    def run(method: str, seed: int, final: list[float] | None) -> BenchRow:
        folder = tmp_path / method / str(seed)
        folder.mkdir(parents=True)
        norms = {"block_grad_norms": {"0": 2.0, "1": 1.0}}
        (folder / "adapter_telemetry.jsonl").write_text(json.dumps({"step": 0, **norms}) + "\n")
        if final is not None:

            def layers(values: list[float]) -> dict:
                return {
                    f"l{i}": {"lambda": v, "grad_low_rank": 1.0 + i, "grad_orthogonal": 1.0}
                    for i, v in enumerate(values)
                }

            rows = [{"step": 0, "layers": layers([0.5] * len(final))}, {"step": 1, "layers": layers(final)}]
            (folder / "mixing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return BenchRow("t", method, seed, "ok", method, "m", "b", "accuracy", 1e-3, folder=str(folder))

    rows = [
        run("hybrid", 0, [0.1, 0.2, 0.3]),
        run("hybrid", 1, [0.2, 0.3, 0.4]),
        run("hybrid", 2, [0.6, 0.7, 0.8]),
        run("lora", 0, None),
    ]
    table = {line.split(" | ")[1]: line for line in telemetry_lines(rows) if line.startswith("| t |")}
    assert table["hybrid"].split(" | ")[2:] == [
        "2.000",
        "–",
        "1.000",
        "0.300 |",
    ]  # λ rises with ‖∇‖: ρ = 1; median of 0.2, 0.3, 0.7
    assert table["lora"].endswith("| 2.000 | – | – | – |")


def test_the_time_left_counts_only_the_runs_that_will_train() -> None:
    """A bench that reuses finished runs estimates the time left from the runs still to train, not from every run
    it has yet to report (reused runs take no time)."""
    from types import SimpleNamespace

    from hybrid_peft.bench.running import _Progress

    def run(seed: int) -> SimpleNamespace:
        config = SimpleNamespace(learning_rate=1e-3)
        return SimpleNamespace(task="t", method="lora", seed=seed, config=config, folder=Path("seed"), key=("t", seed))

    failed = SimpleNamespace(ok=False, error="x")
    lines: list[str] = []
    progress = _Progress(6, lines.append, reusable={("t", 2), ("t", 3), ("t", 4)})  # runs 2–4 finished earlier
    progress.report(run(0), failed, 60.0, ran=True)
    assert lines[-1].endswith("about 2 min 00 s left)")  # runs 1 and 5 still train, at 60 s each
    progress.report(run(2), failed, 0.0, ran=False)
    assert lines[-1].endswith("about 2 min 00 s left)")  # a reused run changes nothing
    for seed in (3, 4):
        progress.report(run(seed), failed, 0.0, ran=False)
    progress.report(run(1), failed, 120.0, ran=True)
    assert lines[-1].endswith("about 1 min 30 s left)")  # one run to go at the median of 60 s and 120 s
    progress.report(run(5), failed, 60.0, ran=True)
    assert lines[-1].startswith("[6/6]") and "left" not in lines[-1]
