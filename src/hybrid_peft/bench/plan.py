"""A bench config as a plan: its tasks, methods, seeds and sweep, each (task, method, seed) a validated training
config (:class:`BenchRun`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hybrid_peft.bench.rows import REFERENCE
from hybrid_peft.errors import ConfigError
from hybrid_peft.run import TrainConfig, merge_options


@dataclass(frozen=True)
class BenchRun:
    task: str
    method: str
    seed: int
    config: TrainConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def key(self) -> tuple[str, str, int, float]:
        return self.task, self.method, self.seed, self.config.learning_rate


@dataclass(frozen=True)
class Sweep:
    """A learning-rate sweep: each method at its rate times each factor, on one seed, trained without
    ``validation_examples`` held-out training rows and ranked on them (never on the evaluation set); the best rate
    then runs on every seed. Ranked by the task's primary metric, ties broken by the validation loss (``select:
    loss`` ranks by the loss alone)."""

    factors: tuple[float, ...]
    seed: int = 0
    validation_examples: int = 256
    select: str = "metric"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Sweep:
        known = {"factors", "seed", "validation_examples", "select"}
        if not isinstance(data, dict) or not data.get("factors") or set(data) - known:
            raise ConfigError(
                f"{where}: 'sweep' takes {{factors: [0.3, 1, 3, 10], seed: 0, validation_examples: 256, select: "
                f"metric|loss}} (factors of each method's rate), got {data!r}"
            )
        factors = tuple(float(f) for f in data["factors"])
        if any(f <= 0 for f in factors) or len(set(factors)) != len(factors):
            raise ConfigError(f"{where}: sweep factors must be distinct and positive, got {list(factors)}")
        sweep = cls(
            factors, int(data.get("seed", 0)), int(data.get("validation_examples", 256)), data.get("select", "metric")
        )
        if sweep.select not in ("metric", "loss") or sweep.validation_examples < 1:
            raise ConfigError(f"{where}: sweep needs select 'metric' or 'loss' and validation_examples ≥ 1")
        return sweep

    def rates(self, base: float, factors: tuple[float, ...] | None = None) -> list[float]:
        return [float(f"{base * factor:.2g}") for factor in (self.factors if factors is None else factors)]


@dataclass(frozen=True)
class BenchPlan:
    name: str
    output_dir: Path
    seeds: tuple[int, ...]
    tasks: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    run_timeout_s: float = 3600.0
    sweep: Sweep | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # over every run's options (``bench --set``)
    # the methods every other is compared with in pairs: the first in the main table, each further one in its own
    references: tuple[str, ...] = (REFERENCE,)
    # methods swept at other factors than the sweep's (``bench --methods M --sweep-factors F``): the others keep the
    # config's, so a bench that narrows one method's sweep still ranks every recorded method on its own candidates
    method_factors: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def factors(self, method_key: str) -> tuple[float, ...]:
        """The sweep factors (of its rate) that ``method_key`` is ranked on; none without a sweep."""
        if self.sweep is None:
            return ()
        return self.method_factors.get(method_key, self.sweep.factors)

    def _check(self, tasks: list[str] | None, methods: list[str] | None) -> None:
        for chosen, known, kind in ((tasks, self.tasks, "task"), (methods, self.methods, "method")):
            unknown = sorted(set(chosen or []) - set(known))
            if unknown:
                raise ConfigError(f"bench {self.name}: unknown {kind}(s) {unknown}; this config has {sorted(known)}")

    def _pairs(self, tasks: list[str] | None, methods: list[str] | None) -> list[tuple[str, str]]:
        self._check(tasks, methods)
        return [
            (task, method)
            for task in self.tasks
            if not tasks or task in tasks
            for method in self.methods
            if not methods or method in methods
        ]

    def run(self, task_key: str, method_key: str, seed: int, learning_rate: float | None = None) -> BenchRun:
        """One validated run: options merge defaults < task < method < the method's entry for the task; with a
        sweep, ``learning_rate`` (else the merged options' rate) and the validation rows are set too."""
        method_options = dict(self.methods[method_key])
        per_task = method_options.pop("tasks", {}) or {}
        options = merge_options(self.defaults, self.tasks[task_key])
        options = merge_options(options, method_options)
        options = merge_options(merge_options(options, per_task.get(task_key, {})), self.overrides)
        folder = self.output_dir / "runs" / task_key / method_key
        if self.sweep is not None:
            options.setdefault("validation_examples", self.sweep.validation_examples)
            if learning_rate is None:
                learning_rate = self.base_rate(task_key, method_key)
            options["learning_rate"] = learning_rate
            folder = folder / f"lr-{learning_rate:g}"
        options |= {"seed": seed, "output_dir": str(folder / f"seed-{seed}")}
        options.setdefault("before_cache", str(self.output_dir / "before"))  # one evaluation of the base model
        try:
            config = TrainConfig.from_dict(options)
        except ConfigError as exc:
            raise ConfigError(f"bench {self.name}, task {task_key}, method {method_key}: {exc}") from exc
        return BenchRun(task_key, method_key, seed, config)

    def base_rate(self, task_key: str, method_key: str) -> float:
        """The rate the config gives (or the method's default): the centre of its sweep."""
        method_options = dict(self.methods[method_key])
        per_task = method_options.pop("tasks", {}) or {}
        options = merge_options(merge_options(self.defaults, self.tasks[task_key]), method_options)
        try:
            options = merge_options(merge_options(options, per_task.get(task_key, {})), self.overrides)
            return float(TrainConfig.from_dict(options).learning_rate)
        except ConfigError as exc:
            raise ConfigError(f"bench {self.name}, task {task_key}, method {method_key}: {exc}") from exc

    def sweep_runs(self, tasks: list[str] | None = None, methods: list[str] | None = None) -> list[BenchRun]:
        """The sweep's runs (none without a sweep): every selected (task, method) at each candidate rate."""
        if self.sweep is None:
            return []
        return [
            self.run(task, method, self.sweep.seed, rate)
            for task, method in self._pairs(tasks, methods)
            for rate in self.sweep.rates(self.base_rate(task, method), self.factors(method))
        ]

    def runs(
        self,
        tasks: list[str] | None = None,
        methods: list[str] | None = None,
        seeds: list[int] | None = None,
        rates: dict[tuple[str, str], float] | None = None,
    ) -> list[BenchRun]:
        """Every (task, method, seed) as a validated training config; ``tasks``/``methods`` select by key, ``seeds``
        replaces the config's seeds. With a sweep, each (task, method) runs at its chosen rate from ``rates``; pairs
        without one (their sweep has not finished) are left out."""
        runs = []
        for task, method in self._pairs(tasks, methods):
            if self.sweep is not None and (rates is None or (task, method) not in rates):
                continue
            rate = rates[task, method] if self.sweep is not None and rates else None
            runs += [self.run(task, method, seed, rate) for seed in (self.seeds if seeds is None else seeds)]
        return runs


def builtin_profiles() -> list[str]:
    folder = resources.files("hybrid_peft") / "bench_profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_plan(
    config: str,
    output_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    sweep_factors: list[float] | None = None,
    sweep_methods: list[str] | None = None,
) -> BenchPlan:
    """A built-in profile name (``quick``, ``full``, ``math``, ...) or a YAML/JSON file; ``overrides`` are training
    options set on every run over the config's own (``learning_rate`` included: a sweep then centres on it);
    ``sweep_factors`` replace the sweep's factors (e.g. ``[3]`` to rerun only the point an earlier sweep chose, or
    ``[1, 1.67, 3]`` to add a point between two): of ``sweep_methods`` only when given, else of every method."""
    import yaml

    if config in builtin_profiles():
        text = (resources.files("hybrid_peft") / "bench_profiles" / f"{config}.yaml").read_text(encoding="utf-8")
        name = config
    else:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"bench config {config!r} is neither a built-in profile {builtin_profiles()} nor a file")
        text, name = path.read_text(encoding="utf-8"), path.stem
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"bench config {config}: not valid YAML/JSON ({exc})") from exc
    known = {
        "output_dir",
        "seeds",
        "tasks",
        "methods",
        "defaults",
        "run_timeout_s",
        "description",
        "sweep",
        "references",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"bench config {config}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    for key in ("tasks", "methods"):
        if not isinstance(data.get(key), dict) or not data[key]:
            raise ConfigError(f"bench config {config}: '{key}' must map names to training options")
    sweep = Sweep.from_dict(data["sweep"], f"bench config {config}") if data.get("sweep") is not None else None
    method_factors: dict[str, tuple[float, ...]] = {}
    if sweep_factors is not None:
        if sweep is None:
            raise ConfigError(f"bench config {config} has no sweep, so sweep factors cannot replace its own")
        narrowed = Sweep.from_dict(
            {
                "factors": list(sweep_factors),
                "seed": sweep.seed,
                "validation_examples": sweep.validation_examples,
                "select": sweep.select,
            },
            "sweep factors",
        )
        if sweep_methods:
            unknown = sorted(set(sweep_methods) - set(data["methods"]))
            if unknown:
                raise ConfigError(
                    f"bench {name}: unknown method(s) {unknown}; this config has {sorted(data['methods'])}"
                )
            method_factors = {method: narrowed.factors for method in sweep_methods}
        else:
            sweep = narrowed
    plan = BenchPlan(
        name=name,
        output_dir=Path(output_dir or data.get("output_dir") or f"runs/bench-{name}"),
        seeds=tuple(data.get("seeds", [0])),
        tasks=data["tasks"],
        methods=data["methods"],
        defaults=data.get("defaults", {}) or {},
        run_timeout_s=float(data.get("run_timeout_s", 3600)),
        sweep=sweep,
        overrides=dict(overrides or {}),
        references=_references(data["references"], data["methods"], config) if "references" in data else (REFERENCE,),
        method_factors=method_factors,
    )
    # every combination validates before anything runs
    plan.sweep_runs() if plan.sweep is not None else plan.runs()
    return plan


def _references(value: Any, methods: dict[str, Any], config: str) -> tuple[str, ...]:
    """The config's ``references``: method keys of the config, the first the main table's reference."""
    references = [value] if isinstance(value, str) else value
    if not isinstance(references, list) or not references or len(set(references)) != len(references):
        raise ConfigError(f"bench config {config}: 'references' takes a list of method keys, e.g. [lora, hybrid]")
    unknown = [r for r in references if r not in methods]
    if unknown:
        raise ConfigError(
            f"bench config {config}: references {unknown} are not methods of this config ({sorted(methods)})"
        )
    return tuple(references)
