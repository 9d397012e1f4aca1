"""Where task data comes from: ``--data-dir``, ``$HYBRID_PEFT_DATA``, or a ``shared/data`` folder found above the
working directory. Each task names its own sub-folder (``Task.data_folder``)."""

from __future__ import annotations

import os
from pathlib import Path

from hybrid_peft.errors import TaskDataError


def default_data_dir() -> Path | None:
    """``$HYBRID_PEFT_DATA``, else the first ``shared/data`` folder found from the working directory upwards."""
    if env := os.environ.get("HYBRID_PEFT_DATA"):
        return Path(env)
    for parent in [Path.cwd(), *Path.cwd().parents]:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def read_text(path: Path, what: str = "") -> str:
    """The file's text as UTF-8 (a leading byte-order mark dropped); text that is not UTF-8 is an error naming the
    file, the line and the fix."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TaskDataError(
            f"{what + ': ' if what else ''}{path}:{line} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` when given, else :func:`default_data_dir`; an error saying how to provide one when neither."""
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    if base is None:
        raise TaskDataError(
            "no data folder: pass --data-dir (or data_dir=) or set HYBRID_PEFT_DATA to the folder that holds "
            "gsm8k/, glue/, xnli/, ..."
        )
    return base
