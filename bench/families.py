"""What PEFT wraps, per family, for q,k,v,o / mlp / all-linear, as the study builds its adapters.

    python bench/families.py > /tmp/families.md     # ~20 s, meta device (no weights)

Each family is built from transformers' own config (tiny, as tests/test_modules.py sizes it); the
cells list the per-layer module names (and 3-D expert weights) PEFT wrapped, or why a request is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

REQUESTS = (["q", "k", "v", "o"], ["mlp"], ["all-linear"])
EXTRA_FAMILIES = ("granitemoe", "mamba", "rwkv")  # not in the table: inferred, or refused


def cell(model_type: str, groups: list[str]) -> str:
    from peft import LoraConfig, get_peft_model
    from test_modules import build

    from lora_study.study.modules import (
        ModuleResolutionError,
        expert_parameter_names,
        layout_for,
        linear_layer_names,
        peft_wrapped,
        resolve_targets,
        targets_as_given,
    )

    model = build(model_type)
    names = linear_layer_names(model)
    layout, _ = layout_for(model_type, names, expert_parameter_names(model))
    try:
        targets = resolve_targets(layout, groups, names, model_type)
    except ModuleResolutionError as error:
        return "refused: " + str(error).split(";")[0][:80]
    with targets_as_given():
        wrapped = peft_wrapped(get_peft_model(build(model_type), LoraConfig(r=2, **targets.lora_kwargs())))
    return ", ".join(f"`{name}`" for name in sorted(wrapped)) or "-"


def main() -> None:
    from test_modules import build

    from lora_study.study.modules import ARCHITECTURES, expert_parameter_names, layout_for, linear_layer_names

    print("| model_type | layout | q,k,v,o | mlp | all-linear |\n|---|---|---|---|---|")
    for model_type in (*ARCHITECTURES, *EXTRA_FAMILIES):
        model = build(model_type)
        layout, source = layout_for(model_type, linear_layer_names(model), expert_parameter_names(model))
        cells = " | ".join(cell(model_type, groups) for groups in REQUESTS)
        print(f"| `{model_type}` | {layout.name if layout else 'none'} ({source}) | {cells} |")


if __name__ == "__main__":
    main()
