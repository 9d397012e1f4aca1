"""Run records: the few small files of a finished bench run that its tables and plots are made from (the summary,
the training and mixing logs, the adapter telemetry, each evaluation row's score), without its weights or reports.

``hybrid-peft bench PROFILE --records DIR`` copies the records in ``DIR`` into the bench's output before it plans
(a run whose record is there is finished and reused, exactly as if it had run here, as long as its options are
today's: :func:`~hybrid_peft.bench.running.finished_summary` decides) and writes every finished run's record back to
``DIR`` after each run that trains (so an interrupted bench keeps them) and at the end. Kept beside a published
table, the records let anyone rebuild and check it, and let a bench go on (more seeds, another method paired with
the same references) on a machine that never ran the first runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from hybrid_peft.errors import ConfigError
from hybrid_peft.fileio import atomic_path
from hybrid_peft.run.folder import EXAMPLES_FILE, LOG_FILE, MIXING_FILE
from hybrid_peft.run.summary import SUMMARY_FILE
from hybrid_peft.telemetry import ADAPTER_TELEMETRY_FILE

RECORD_FILES = (SUMMARY_FILE, LOG_FILE, MIXING_FILE, ADAPTER_TELEMETRY_FILE, EXAMPLES_FILE)


def recorded_runs(root: Path) -> list[Path]:
    """The run folders under ``root`` that hold a finished run's summary, relative to ``root``, sorted."""
    if not root.is_dir():
        return []
    return sorted(path.parent.relative_to(root) for path in root.rglob(SUMMARY_FILE))


def portable_summary(text: str, relative: Path) -> str:
    """A summary as a record keeps it: a folder given as an absolute path (``--output-dir /home/...``, the bench's
    ``before_cache``) becomes relative, to the working directory when it lies below it, else its place in the bench's
    layout (the run's folder, ``before``), so a record names no path of the machine that made it (neither folder is
    compared when a record is reused)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text  # copied as it is; reading it as a run's summary is the bench's to refuse
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        return text
    changed = False
    for key, in_layout in (("output_dir", str(relative)), ("before_cache", "before")):
        folder = config.get(key)
        if not isinstance(folder, str) or not Path(folder).is_absolute():
            continue
        try:
            config[key] = str(Path(folder).relative_to(Path.cwd()))
        except ValueError:
            config[key] = in_layout
        changed = True
    return json.dumps(data, indent=2) + "\n" if changed else text


def _copy_record(source: Path, target: Path, relative: Path | None = None) -> bool:
    """Make ``target``'s record files those of ``source`` (each written atomically, the summary last so a
    half-copied record never reads as a finished run; a record file ``source`` lacks is removed, so no log of an
    unfinished run is left beside a finished summary); with ``relative`` (the run's place in the layout) the summary
    is made portable (:func:`portable_summary`). False when ``target`` already holds the same record."""
    contents = {name: (source / name).read_bytes() for name in RECORD_FILES if (source / name).is_file()}
    if relative is not None and SUMMARY_FILE in contents:
        text = portable_summary(contents[SUMMARY_FILE].decode("utf-8"), relative)
        contents[SUMMARY_FILE] = text.encode("utf-8")
    same = all((target / n).is_file() and (target / n).read_bytes() == data for n, data in contents.items())
    if same and not any((target / name).exists() for name in RECORD_FILES if name not in contents):
        return False
    target.mkdir(parents=True, exist_ok=True)
    (target / SUMMARY_FILE).unlink(missing_ok=True)
    for name in RECORD_FILES:
        if name not in contents:
            (target / name).unlink(missing_ok=True)
    for name in sorted(contents, key=lambda name: name == SUMMARY_FILE):
        with atomic_path(target / name) as temporary:
            Path(temporary).write_bytes(contents[name])
    return True


def import_records(records: Path, runs_root: Path) -> int:
    """Copy every run record in ``records`` whose run has not finished under ``runs_root`` (a run that finished
    here keeps its own files); returns how many were copied. A ``records`` folder that does not exist yet has none
    (:func:`export_records` makes it); a file there is an error."""
    if records.exists() and not records.is_dir():
        raise ConfigError(f"records: {records} is a file; give a folder of run records (or a new folder's path)")
    if not records.is_dir():
        return 0
    copied = 0
    for relative in recorded_runs(records):
        if not (runs_root / relative / SUMMARY_FILE).is_file():
            copied += _copy_record(records / relative, runs_root / relative)
    return copied


def export_records(runs_root: Path, records: Path) -> int:
    """Write the record of every finished run under ``runs_root`` to ``records`` (same layout); returns how many
    were new or changed. A summary's absolute run folder is written relative (:func:`portable_summary`)."""
    return sum(
        _copy_record(runs_root / relative, records / relative, relative) for relative in recorded_runs(runs_root)
    )
