"""The field's newer claims about LoRA, restated as questions and answered from this study's runs.

Learning rate: LoRA's best is about 10x full fine-tuning's, and does not move with rank at fixed alpha ("LoRA
Without Regret", 2025); all layers beat attention-only at equal trainable parameters (same report); LoRA forgets
less than full fine-tuning at equal learning (Biderman et al. 2024, "LoRA Learns Less and Forgets Less"); LoRA
degrades more than full fine-tuning as the batch grows ("LoRA Without Regret"). Each answer is supported /
contradicted / inconclusive from verdicts on per-row scores (seed noise included where measured), or "not tested"
naming the runs the study lacks. config/questions.yaml is a study that tests them all on the default model.
"""

from __future__ import annotations

import math

import pandas as pd

from lora_study.analysis.runs import trained_runs
from lora_study.questions.common import sweep_slice
from lora_study.questions.reference_claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_TESTED,
    SUPPORTED,
    Claim,
    claim_answer,
    one_sided,
    untested,
)
from lora_study.questions.training_axes import (
    best_per_rank,
    complete_block,
    cross_rank_pairs,
    selection_comparisons,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.stats.verdicts import GENERAL, Comparison, Judge, Verdict, against_best
from lora_study.study.methods import FULL, LORA

LR = "training.learning_rate"
BATCH = "training.batch_size"
FIXED = ["rank", "alpha", "modules_label", "quant_label"]


def _fitting(runs: pd.DataFrame, method: str) -> pd.DataFrame:
    trained = trained_runs(runs)
    uniform = trained["rank_pattern"].eq("")  # the claims are about one rank for every layer
    return trained[(trained["method"] == method) & uniform & trained["fits"]].dropna(subset=["perplexity"])


# A method's learning-rate sweep judged: its best run, every other run with its verdict against it, the sweep.
LearningRateSweep = tuple[pd.Series, list[tuple[pd.Series, Comparison | None]], pd.DataFrame]


def _best_learning_rate(runs: pd.DataFrame, method: str, judge: Judge, settings: FindingSettings
                        ) -> LearningRateSweep | None:  # fmt: skip
    """The method's learning-rate sweep (all else equal): its best run, every other run's verdict against it
    (m = every pair of the sweep: the best was picked from it), and the sweep."""
    group = sweep_slice(_fitting(runs, method), LR, FIXED) if LR in runs else None
    if group is None:
        return None
    best = group.loc[group["perplexity"].idxmin()]
    m = against_best(len(group))
    others = [(row, judge.compare(row["run_id"], best["run_id"], "perplexity", settings.sweet_spot_tolerance, m))
              for _, row in group.iterrows() if row["run_id"] != best["run_id"]]  # fmt: skip
    return best, others, group


def learning_rate_ratio_claim(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> Claim:
    claim = "LoRA's best learning rate is about 10x full fine-tuning's."
    question = ("Is the best LoRA learning rate 10x the best full fine-tuning one (within a factor of sqrt(10)), "
                "each best shown better than its sweep's other learning rates?")  # fmt: skip
    lora, full = (_best_learning_rate(runs, method, judge, settings) for method in (LORA, FULL))
    if lora is None or full is None:
        return untested(claim, question, "learning-rate sweep of both LoRA and full fine-tuning")
    ratio = lora[0][LR] / full[0][LR]
    evidence = f"best LoRA {lora[0][LR]:g} ({lora[0]['run_id']}), best full {full[0][LR]:g} ({full[0]['run_id']}): " \
               f"{ratio:.3g}x"  # fmt: skip
    unsettled = [(row, result) for _, others, _ in (lora, full) for row, result in others
                 if result is None or result.verdict is not Verdict.WORSE]  # fmt: skip
    if unsettled:
        row, result = unsettled[0]
        said = result.describe() if result else "no per-row scores"
        return Claim(claim, question, INCONCLUSIVE, f"{evidence}; but {row['run_id']} is {said} against its "
                     "sweep's best, so the best learning rate is not pinned down")  # fmt: skip
    edges = []
    for name, (best, _, sweep) in ((LORA, lora), (FULL, full)):
        largest, smallest = sweep[LR].max(), sweep[LR].min()
        if best[LR] in (largest, smallest):
            side = "largest" if best[LR] == largest else "smallest"
            edges.append(f"{name}'s best is its sweep's {side} learning rate")
    if edges:
        return Claim(claim, question, INCONCLUSIVE, f"{evidence}; but {', '.join(edges)}: the best may lie beyond "
                     "the sweep")  # fmt: skip
    close = 10 / math.sqrt(10) <= ratio <= 10 * math.sqrt(10)
    return Claim(claim, question, SUPPORTED if close else CONTRADICTED,
                 f"{evidence}; every other learning rate worse than its sweep's best")  # fmt: skip


def learning_rate_rank_claim(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> Claim:
    claim = "LoRA's best learning rate does not move with rank (alpha fixed)."
    question = ("At one alpha for every rank, is each rank's best learning rate equivalent (within the tolerance) "
                "to every other rank's best?")  # fmt: skip
    cells = fixed_alpha_cells(runs)
    if cells is None:
        return untested(claim, question, "rank x learning-rate grid at one alpha for every rank")
    alphas = set(cells["alpha"])
    best = best_per_rank(cells)
    listed = ", ".join(f"rank {int(r)}: {best.loc[r, 'learning_rate']:g}" for r in best.index)
    m = selection_comparisons(cells)
    results = [(rank, lr, judge.compare(candidate, reference, "perplexity", settings.sweet_spot_tolerance, m))
               for rank, lr, candidate, reference in cross_rank_pairs(cells, best)]  # fmt: skip
    if not results:
        lr = best["learning_rate"].iloc[0]
        if lr in (cells["learning_rate"].max(), cells["learning_rate"].min()):
            return Claim(claim, question, INCONCLUSIVE, f"alpha {alphas.pop():g}; best per rank {listed}: the same "
                         "at every rank, but the sweep's edge: the best may lie beyond it")  # fmt: skip
        return Claim(claim, question, SUPPORTED, f"alpha {alphas.pop():g}; best per rank {listed}: the same at "
                     "every rank")  # fmt: skip
    worse = [(rank, lr, r) for rank, lr, r in results if r is not None and r.verdict is Verdict.WORSE]
    if worse:
        rank, lr, result = worse[0]
        return Claim(claim, question, CONTRADICTED, f"best per rank {listed}; at rank {int(rank)} learning rate "
                     f"{lr:g} is {result.describe()} against that rank's best")  # fmt: skip
    if all(r is not None and r.verdict is Verdict.EQUIVALENT for _, _, r in results):
        return Claim(claim, question, SUPPORTED, f"best per rank {listed}; each rank's best is equivalent at every "
                     f"other rank ({len(results)} comparisons)")  # fmt: skip
    rank, lr, result = next(
        (rank, lr, r) for rank, lr, r in results if r is None or r.verdict is not Verdict.EQUIVALENT
    )
    said = result.describe() if result else "not judged"
    return Claim(claim, question, INCONCLUSIVE, f"best per rank {listed}; at rank {int(rank)} learning rate {lr:g} "
                 f"is {said}")  # fmt: skip


def fixed_alpha_cells(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The largest complete rank x learning-rate block of LoRA runs sharing one alpha, all else equal, as cells
    (run_id, rank, learning_rate, alpha, perplexity); None without one. (The report's matrices keep alpha's rule
    fixed instead, 2r by default, so a fixed alpha is found here.)"""
    lora = _fitting(runs, LORA)
    if LR not in lora or lora.empty:
        return None
    keys = ["alpha", "modules_label", "quant_label", *_settings_but_learning_rate(lora)]
    best = None
    for _, group in lora.groupby(keys, dropna=False, sort=False):
        block = complete_block(group, "rank", LR) if group["rank"].nunique() >= 2 else None
        if block is not None and block[LR].nunique() >= 2 and (best is None or len(block) > len(best)):
            best = block
    if best is None:
        return None
    return pd.DataFrame({"run_id": best["run_id"], "rank": best["rank"], "learning_rate": best[LR],
                         "alpha": best["alpha"], "perplexity": best["perplexity"]})  # fmt: skip


def all_layers_claim(runs: pd.DataFrame, judge: Judge) -> Claim:
    claim = "All layers beat attention-only at equal trainable parameters."
    question = ("Does LoRA on attention and MLP reach a lower perplexity than attention-only LoRA with about the "
                "same trainable parameters (within 25%), all else equal?")  # fmt: skip
    lora = _fitting(runs, LORA)
    with_mlp = lora["modules_label"].str.contains("mlp") | (lora["modules_label"] == "all")
    keys = ["quant_label", "method", *_settings_but_learning_rate(lora)]
    pairs = []
    for _, everywhere in lora[with_mlp].iterrows():
        for _, attention in lora[~with_mlp].iterrows():
            same = all(_same(everywhere[k], attention[k]) for k in keys)
            ratio = everywhere["trainable_params"] / attention["trainable_params"]
            if same and 0.8 <= ratio <= 1.25 and everywhere.get(LR) == attention.get(LR):
                pairs.append((abs(math.log(ratio)), everywhere, attention, ratio))
    if not pairs:
        return untested(claim, question, "attention-only and all-layer runs with about equal trainable parameters")
    _, everywhere, attention, ratio = min(pairs, key=lambda pair: pair[0])
    result = judge.compare(everywhere["run_id"], attention["run_id"], "perplexity", 0.0)
    answer = claim_answer(result, 0.0, below_is_claimed=True) if result else INCONCLUSIVE
    return Claim(claim, question, answer, f"{everywhere['run_id']} vs {attention['run_id']} ({ratio:.2f}x the "
                 f"parameters): {one_sided(result) if result else 'no per-row scores'}")  # fmt: skip


def _same(first, second) -> bool:
    return (pd.isna(first) and pd.isna(second)) or first == second


def _settings_but_learning_rate(frame: pd.DataFrame) -> list[str]:
    """The training settings two runs must share to be compared while each keeps its own learning rate."""
    return [column for column in frame.columns if column.startswith("training.") and column != LR]


def forgetting_claim(forgetting: pd.DataFrame | None, runs: pd.DataFrame, judge: Judge, settings: FindingSettings
                     ) -> Claim:  # fmt: skip
    claim = "LoRA forgets less than full fine-tuning at equal learning."
    question = ("In one weight format and training setting, does a LoRA run that learns as much as full "
                "fine-tuning (equivalent or better validation perplexity) forget less (lower general-text "
                "perplexity)?")  # fmt: skip
    if forgetting is None or not (forgetting["method"] == FULL).any() or not (forgetting["method"] == LORA).any():
        return untested(claim, question, "full fine-tuning and LoRA runs scored on general text "
                         "(evaluation.forgetting)")  # fmt: skip
    pairs = _learning_pairs(forgetting, runs)
    if not pairs:
        return untested(claim, question, "LoRA run beside a full fine-tuning run in the same format and training "
                         "settings (learning rate aside)")  # fmt: skip
    learned = []
    for lora, full in pairs:
        result = judge.compare(lora["run_id"], full["run_id"], "perplexity", settings.sweet_spot_tolerance,
                               len(pairs))  # fmt: skip
        if result is not None and result.verdict in (Verdict.EQUIVALENT, Verdict.BETTER):
            learned.append((lora, full, result))
    if not learned:
        lora, full = min(pairs, key=lambda pair: pair[0]["perplexity"] / pair[1]["perplexity"])
        return Claim(claim, question, INCONCLUSIVE, f"no LoRA run is shown to learn as much as full fine-tuning in "
                     f"the same setting (closest: {lora['run_id']}, perplexity {lora['perplexity']:.4g} vs "
                     f"{full['run_id']}'s {full['perplexity']:.4g})")  # fmt: skip
    # Every LoRA run that learned as much is judged (m = all of them), none picked for its forgetting.
    judged = [(lora, full, learning, judge.compare(lora["run_id"], full["run_id"], GENERAL, 0.0, len(learned)))
              for lora, full, learning in learned]  # fmt: skip
    answers = [claim_answer(result, 0.0, below_is_claimed=True) if result else INCONCLUSIVE for *_, result in judged]
    answer = (CONTRADICTED if CONTRADICTED in answers else SUPPORTED if set(answers) == {SUPPORTED}
              else INCONCLUSIVE)  # fmt: skip
    evidence = "; ".join(f"{lora['run_id']} vs {full['run_id']}: learning {learning.describe()}; general text "
                         f"{one_sided(result) if result else 'no per-row scores'}"
                         for lora, full, learning, result in judged)  # fmt: skip
    return Claim(claim, question, answer, evidence)


def _learning_pairs(forgetting: pd.DataFrame, runs: pd.DataFrame) -> list[tuple[pd.Series, pd.Series]]:
    """(LoRA run, full fine-tuning run) pairs in one weight format with the same training settings, the
    learning rate aside (each method its own), both scored on general text: each LoRA run against its setting's
    best-learning full fine-tuning run."""
    settings = runs.set_index("run_id")
    keys = ["quant_label", *_settings_but_learning_rate(runs)]
    lora = forgetting[forgetting["method"] == LORA]
    full = forgetting[forgetting["method"] == FULL]

    def setting(run_id: str) -> tuple:
        return tuple("nan" if pd.isna(value) else value for value in settings.loc[run_id, keys])

    # Each setting's full fine-tuning is its best-learning run (lowest validation perplexity).
    best_full = full.assign(setting=full["run_id"].map(setting)).sort_values("perplexity").drop_duplicates("setting")
    by_setting = {row["setting"]: row for _, row in best_full.iterrows()}
    return [(a, by_setting[setting(a["run_id"])]) for _, a in lora.iterrows() if setting(a["run_id"]) in by_setting]


def batch_claim(runs: pd.DataFrame, judge: Judge, settings: FindingSettings) -> Claim:
    claim = "LoRA degrades more than full fine-tuning as the batch grows."
    question = ("From the smallest to the largest batch swept (all else equal), does LoRA's perplexity get worse "
                "while full fine-tuning's does not?")  # fmt: skip
    changes = {}
    for method in (LORA, FULL):
        group = sweep_slice(_fitting(runs, method), BATCH, FIXED) if BATCH in runs else None
        if group is None:
            return untested(claim, question, "batch-size sweep of both LoRA and full fine-tuning")
        small, large = group.loc[group[BATCH].idxmin()], group.loc[group[BATCH].idxmax()]
        result = judge.compare(large["run_id"], small["run_id"], "perplexity", settings.sweet_spot_tolerance, 2)
        changes[method] = (small, large, result)
    if any(result is None for _, _, result in changes.values()):
        return Claim(claim, question, INCONCLUSIVE, "no per-row scores")
    text = "; ".join(f"{method} batch {int(large[BATCH])} vs {int(small[BATCH])}: {result.describe()}"
                     for method, (small, large, result) in changes.items())  # fmt: skip
    lora_change, full_change = changes[LORA][2], changes[FULL][2]
    lora, full = lora_change.verdict, full_change.verdict
    if lora is Verdict.WORSE and full in (Verdict.EQUIVALENT, Verdict.BETTER):
        return Claim(claim, question, SUPPORTED, text)
    if lora in (Verdict.EQUIVALENT, Verdict.BETTER):
        return Claim(claim, question, CONTRADICTED, text)
    if lora is Verdict.WORSE and full is Verdict.WORSE:
        # Both degrade: by how much, from the two intervals (apart: a difference at a stricter level than each).
        if lora_change.low > full_change.high:
            return Claim(claim, question, SUPPORTED, f"{text}; LoRA's interval lies above full fine-tuning's")
        if lora_change.high < full_change.low:
            return Claim(claim, question, CONTRADICTED, f"{text}; LoRA's interval lies below full fine-tuning's")
        return Claim(claim, question, INCONCLUSIVE, f"{text}; both degrade, their intervals overlap")
    return Claim(claim, question, INCONCLUSIVE, text)


def field_claims(study: Study) -> list[Claim]:
    runs, judge, settings = study.runs, study.judge, study.settings
    return [
        learning_rate_ratio_claim(runs, judge, settings),
        learning_rate_rank_claim(runs, judge, settings),
        all_layers_claim(runs, judge),
        forgetting_claim(study.tables.get("forgetting"), runs, judge, settings),
        batch_claim(runs, judge, settings),
    ]


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return {"field_claims": pd.DataFrame([claim.to_dict() for claim in field_claims(study)])}


def findings(study: Study) -> list[str | None]:
    """One sentence per claim the study tested (the untested ones are in the table)."""
    claims = study.tables.get("field_claims")
    if claims is None:
        return []
    return [f"Claim \"{row['claim']}\": {row['answer']} ({row['evidence']})."
            for _, row in claims.iterrows() if row["answer"] != NOT_TESTED]  # fmt: skip


QUESTION = Question(
    anchor="field-claims",
    title="The field's claims, checked",
    tables=tables,
    findings=findings,
    intro=(
        "Newer claims about LoRA from the field, restated as questions and answered from this study's runs "
        "(supported / contradicted / inconclusive / not tested); config/questions.yaml is a study that tests all "
        "of them on the default model."
    ),
    prose_tables=("field_claims",),
    answered_last=True,
)
