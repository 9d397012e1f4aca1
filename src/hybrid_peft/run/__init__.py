"""Running training: the recipe and its parts.

=============  =================================================================================================
config.py      :class:`TrainConfig`, the options of a run (command-line flags, YAML/JSON keys)
trainees.py    one strategy per kind of trainee: own adapter, full fine-tuning, PEFT baseline
loop.py        the one training loop (forward, backward, mixing rule, clip, step, schedule), used everywhere
checkpoint.py  checkpoints in safetensors and JSON (no pickle), resumed exactly
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
