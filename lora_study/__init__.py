"""LoRA/QLoRA efficiency study: the logic behind the Snakemake workflow.

Rule scripts under scripts/ are thin entry points into this package; every
concept (run ids, module groups, metric names, result paths) is defined here once.
"""

__version__ = "0.1.0"
