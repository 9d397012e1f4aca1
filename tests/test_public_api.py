"""The root package exports what a user calls; internals stay importable from their own modules."""

from __future__ import annotations

import importlib

import hybrid_peft

USER_SURFACE = {
    "attach", "detach", "merge", "unmerge", "parameter_groups", "parameter_counts",
    "LoRAConfig", "LoRAGAConfig", "BOFTConfig", "UnitaryConfig", "HybridConfig", "ShareRule", "SigmoidRule",
    "PressureRule", "ProtectRule", "SpectrumRule",
    "save_adapter", "load_adapter", "save_merged", "export_peft",
    "load_model", "load_tokenizer", "lora_ga_initialise", "update_mixing", "mixing_callback", "HybridPeftCallback",
    "HybridPeftError", "__version__",
}  # fmt: skip


def test_the_root_exports_the_user_surface_and_nothing_else() -> None:
    assert set(hybrid_peft.__all__) == USER_SURFACE
    for name in hybrid_peft.__all__:
        assert getattr(hybrid_peft, name) is not None


def test_internals_stay_importable_from_their_modules() -> None:
    for module, name in [
        ("hybrid_peft.adapters", "adapter_layers"),
        ("hybrid_peft.config", "AdapterConfig"),
        ("hybrid_peft.errors", "BaseModelMismatchError"),
        ("hybrid_peft.methods", "HybridLayer"),
        ("hybrid_peft.methods.lora_ga", "lora_ga_factors_for"),
        ("hybrid_peft.registry", "register_method"),
        ("hybrid_peft.serialization", "read_adapter_config"),
        ("hybrid_peft.telemetry", "plot_mixing_heatmap"),
    ]:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_the_loop_the_recipe_and_export_name_no_method() -> None:
    """What a method adds to training or export reaches the loop, the trainees, the Trainer callback and export
    through the layer class's hooks (``AdapterLayer.after_backward`` ...), never by importing the method."""
    import ast
    from pathlib import Path

    from hybrid_peft.registry import available_methods, get_method

    package = Path(hybrid_peft.__file__).parent
    method_names = {get_method(m).layer_class.__name__ for m in available_methods()}
    method_names |= {get_method(m).config_class.__name__ for m in available_methods()}
    files = [*sorted((package / "run").glob("*.py"))]
    files += [package / name for name in ("export.py", "telemetry.py", "integrations.py")]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("hybrid_peft.methods"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Name):
                assert node.id not in method_names, f"{path.name} names {node.id}"
