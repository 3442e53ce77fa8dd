"""The names of the ways a run is deployed and of the merge check's outcomes: torch-free, so the report reads
them without the deploy job's libraries."""

from __future__ import annotations

from lora_study.stats.verdicts import Verdict

# Ways of deploying an adapter, as named in tables.
UNMERGED = "unmerged"
MERGED_16BIT = "merged_16bit"
MERGED_REQUANTIZED = "merged_requantized"
BASE = "base"
FULL = "full"
# The merge check's outcome per way of merging.
MERGE_OK, MERGE_FLAGGED, MERGE_UNCLEAR = "ok", "flagged", "unclear"
# A merge check's outcome from its verdict: a shown change is flagged, an undecided one unclear.
MERGE_OUTCOMES = {Verdict.EQUIVALENT: MERGE_OK, Verdict.BETTER: MERGE_FLAGGED, Verdict.WORSE: MERGE_FLAGGED,
                  Verdict.INCONCLUSIVE: MERGE_UNCLEAR}  # fmt: skip
