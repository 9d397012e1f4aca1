"""Write hybrid adapter files of an earlier format version, for tests/test_legacy_adapters.py.

Run with the hybrid-peft of that version importable (a checkout of the commit that wrote the format), e.g.::

    git worktree add ../v3 3125e77^
    PYTHONPATH=../v3/src python make_legacy_adapters.py OUT LABEL '{"rule": "share"}'

(formats 1, 2, 3 and 4 were written by 193c7c9^, 6e464d9^, 3125e77^ and efd5321; the folders name each file's
version and options).

It attaches a hybrid with the given options to a tiny seeded two-layer model, fills every adapter tensor with seeded
random values (λ 0.3 and 0.7 where a rule or a per-layer start uses it), saves the adapter, loads it onto a fresh copy
of the base *with that version's code*, and stores the base weights, an input and that version's output beside it:
the file and the output it must keep producing.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hybrid_peft import attach, load_adapter, save_adapter
from hybrid_peft.adapters import adapter_layers
from hybrid_peft.methods.hybrid import HybridConfig
from hybrid_peft.serialization import FORMAT_VERSION


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))


def main(out: str, label: str, options: dict) -> None:
    folder = Path(out) / f"v{FORMAT_VERSION}-{label}"
    options = dict(options)
    perturb_mix = options.pop("perturb_mix", True)
    model = base()
    attach(model, HybridConfig(targets=["0", "2"], rank=2, alpha=4.0, block_size=4, **options))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, layer in enumerate(adapter_layers(model).values()):
            for name, tensor in layer.adapter_state().items():
                if name in ("mix", "mix_start"):
                    if perturb_mix:
                        tensor.fill_(0.3 if index == 0 else 0.7)
                elif name == "boft_scale":
                    tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
                else:
                    tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
    save_adapter(model, folder / "adapter")
    fresh = base()
    load_adapter(fresh, folder / "adapter")
    x = torch.randn(5, 16, generator=generator)
    with torch.no_grad():
        y = fresh(x)
    weights = {f"base.{k}": v for k, v in base().state_dict().items()}
    save_file({"x": x, "y": y, **weights}, str(folder / "expected.safetensors"))
    print(folder, FORMAT_VERSION, [f"{name}: {layer.config.rule}" for name, layer in adapter_layers(fresh).items()])


if __name__ == "__main__":
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    main(sys.argv[1], sys.argv[2], options)
