"""Running training: the recipe and its parts.

=============  =================================================================================================
config.py      :class:`TrainConfig`, the options of a run (command-line flags, YAML/JSON keys)
trainees.py    one strategy per kind of trainee: own adapter, full fine-tuning, PEFT baseline
loop.py        the one training loop (forward, backward, mixing rule, clip, step, schedule), used everywhere
parallel.py    one process / DDP, or FSDP2 sharding: the strategy the loop and recipe use for several processes
checkpoint.py  checkpoints in safetensors and JSON (no pickle), resumed exactly
folder.py      the run folder: its outputs, its logs, its lock
memory.py      whether a run fits in memory, before it loads anything
summary.py     :class:`RunSummary`, the typed record of a finished run (``summary.json``)
report.py      ``report.md`` and ``loss.png``
provenance.py  versions, commit, device, peak memory
recipe.py      :class:`Recipe`: the stages of a run, composed from the parts above
=============  =================================================================================================
"""

from hybrid_peft.run.config import TrainConfig, merge_options
from hybrid_peft.run.recipe import Recipe, run_training
from hybrid_peft.run.summary import RunSummary
from hybrid_peft.run.trainees import FULL, trainee_for, training_methods

__all__ = [
    "FULL",
    "Recipe",
    "RunSummary",
    "TrainConfig",
    "merge_options",
    "run_training",
    "trainee_for",
    "training_methods",
]
