"""The reference study's claims, restated as questions and answered from this study's data.

Each claim is one-sided ("less than 3 %", "beats"), so it is decided on the
equivalence (TOST) interval's bounds, each a one-sided test at level alpha:
supported when the whole interval is on the claim's side of its threshold,
contradicted when the whole interval is on the other side, inconclusive when
it straddles the threshold. A claim the study has no runs for is "not tested".
The reference's numbers are not expected values: only its claims are used."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lora_study.questions.common import (
    reference_row,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.stats.verdicts import (
    Comparison,
    Judge,
)
from lora_study.study.methods import LORA

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED = "supported", "contradicted", "inconclusive", "not tested"


@dataclass(frozen=True)
class Claim:
    claim: str
    question: str
    answer: str
    evidence: str

    def to_dict(self) -> dict[str, str]:
        return {"claim": self.claim, "question": self.question, "answer": self.answer, "evidence": self.evidence}


def claim_answer(comparison: Comparison, threshold: float, below_is_claimed: bool) -> str:
    """Supported / contradicted / inconclusive: where the one-sided bounds lie against `threshold`."""
    low, high = comparison.eq_low, comparison.eq_high
    if (high < threshold) if below_is_claimed else (low > threshold):
        return SUPPORTED
    if (low >= threshold) if below_is_claimed else (high <= threshold):
        return CONTRADICTED
    return INCONCLUSIVE


def one_sided(comparison: Comparison) -> str:
    return (
        f"change {100 * comparison.change:+.1f}% [{100 * comparison.eq_low:+.1f}, {100 * comparison.eq_high:+.1f}] "
        f"(one-sided bounds at {1 - 0.05:.0%} each, {comparison.sources})"
    )


def _by(table: pd.DataFrame | None, column: str, value) -> pd.Series | None:
    if table is None or column not in table:
        return None
    match = table[(table[column] == value) & table["perplexity"].notna()]
    return match.iloc[0] if len(match) else None


def untested(claim: str, question: str, missing: str) -> Claim:
    return Claim(claim, question, NOT_TESTED, f"the study has no {missing}")


def rank_claims(ranks: pd.DataFrame | None, judge: Judge, settings: FindingSettings) -> list[Claim]:
    tolerance = settings.sweet_spot_tolerance
    a_claim = "Rank 16 is the sweet spot: close to rank 64's quality at a fraction of its memory."
    a_question = f"Is rank 16's perplexity within {tolerance:.0%} of rank 64's (not worse by more), at less memory?"
    b_claim = "Returns diminish above rank 32: doubling the rank improves quality by less than 2%."
    b_question = "Does rank 64 lower perplexity by less than 2% against rank 32?"
    r16, r32, r64 = (_by(ranks, "rank", r) for r in (16, 32, 64))
    claims = []
    if r16 is None or r64 is None:
        claims.append(untested(a_claim, a_question, "rank 16 and rank 64 runs in one rank sweep"))
    else:
        result = judge.compare(r16["run_id"], r64["run_id"], "perplexity", tolerance)
        ratio = r16["peak_memory_gb"] / r64["peak_memory_gb"]
        answer = claim_answer(result, tolerance, below_is_claimed=True) if result else INCONCLUSIVE
        if answer == SUPPORTED and ratio >= 1:
            answer = CONTRADICTED  # close in quality, but no memory saved
        evidence = (one_sided(result) if result else "no per-row scores") + f"; memory {ratio:.0%} of rank 64's"
        claims.append(Claim(a_claim, a_question, answer, f"rank 16 vs 64: {evidence}"))
    if r32 is None or r64 is None:
        claims.append(untested(b_claim, b_question, "rank 32 and rank 64 runs in one rank sweep"))
    else:
        result = judge.compare(r64["run_id"], r32["run_id"], "perplexity", 0.02)
        answer = claim_answer(result, -0.02, below_is_claimed=False) if result else INCONCLUSIVE
        claims.append(Claim(b_claim, b_question, answer,
                            f"rank 64 vs 32: {one_sided(result) if result else 'no per-row scores'}"))  # fmt: skip
    return claims


def module_claims(modules: pd.DataFrame | None, judge: Judge) -> list[Claim]:
    c_claim = "Q+K+V+O beats Q+V."
    c_question = "Is q,k,v,o's perplexity lower than q,v's at the same rank and quantization?"
    d_claim = "Adding the MLP roughly triples the trainable parameters for about a 2% gain."
    d_question = "Does adding the MLP to q,k,v,o multiply the trainable parameters by 2-4x for a gain of 2% or less?"
    qv, qkvo, mlp = (_by(modules, "modules", label) for label in ("qv", "qkvo", "qkvo-mlp"))
    claims = []
    if qv is None or qkvo is None:
        claims.append(untested(c_claim, c_question, "q,v and q,k,v,o runs in one module sweep"))
    else:
        result = judge.compare(qkvo["run_id"], qv["run_id"], "perplexity", 0.0)
        answer = claim_answer(result, 0.0, below_is_claimed=True) if result else INCONCLUSIVE
        claims.append(Claim(c_claim, c_question, answer,
                            f"q,k,v,o vs q,v: {one_sided(result) if result else 'no per-row scores'}"))  # fmt: skip
    if qkvo is None or mlp is None:
        claims.append(untested(d_claim, d_question, "q,k,v,o and q,k,v,o+mlp runs in one module sweep"))
    else:
        ratio = mlp["trainable_params"] / qkvo["trainable_params"]
        result = judge.compare(mlp["run_id"], qkvo["run_id"], "perplexity", 0.02)
        small_gain = claim_answer(result, -0.02, below_is_claimed=False) if result else INCONCLUSIVE
        answer = small_gain if 2 <= ratio <= 4 else CONTRADICTED
        evidence = f"{ratio:.1f}x the parameters; {one_sided(result) if result else 'no per-row scores'}"
        claims.append(Claim(d_claim, d_question, answer, f"+MLP vs q,k,v,o: {evidence}"))
    return claims


def quantization_claims(
    quant: pd.DataFrame | None, judge: Judge, memory_text: str, predicted_gpu_gb: dict[str, float] | None = None
) -> list[Claim]:
    """NF4's quality cost and memory saving against the unquantized run.

    The memory claim is about GPU memory: a CPU study cannot test it with process RSS (bitsandbytes keeps
    other copies on a CPU), so there it is answered from the planner's predicted GPU memory, labelled
    "predicted", or "not tested" without a prediction.
    """
    e_claim = "4-bit NF4 loses less than 3% quality against 16-bit."
    e_question = "Is NF4's perplexity less than 3% above the unquantized run's?"
    f_claim = "NF4 saves about half the training memory of 16-bit."
    f_question = "Does NF4 need 40-60% less peak training memory than the unquantized run?"
    nf4 = _by(quant, "quantization", "nf4")
    reference = reference_row(quant[quant["perplexity"].notna()]) if quant is not None else None
    if nf4 is None or reference is None:
        missing = "nf4 and unquantized runs in one quantization sweep"
        return [untested(e_claim, e_question, missing), untested(f_claim, f_question, missing)]
    result = judge.compare(nf4["run_id"], reference["run_id"], "perplexity", 0.03)
    answer = claim_answer(result, 0.03, below_is_claimed=True) if result else INCONCLUSIVE
    against = f"nf4 vs {reference['quantization']}"
    quality = Claim(e_claim, e_question, answer,
                    f"{against}: {one_sided(result) if result else 'no per-row scores'}")  # fmt: skip
    return [quality, _memory_claim(f_claim, f_question, nf4, reference, memory_text, predicted_gpu_gb or {})]


def _memory_claim(claim: str, question: str, nf4: pd.Series, reference: pd.Series, memory_text: str,
                  predicted_gpu_gb: dict[str, float]) -> Claim:  # fmt: skip
    against = f"nf4 vs {reference['quantization']}"
    if "CPU" not in memory_text:
        saved = 1 - nf4["peak_memory_gb"] / reference["peak_memory_gb"]
        answer = SUPPORTED if 0.4 <= saved <= 0.6 else CONTRADICTED
        return Claim(claim, question, answer, f"{against}: {_saving(saved)} peak memory; {memory_text}")
    nf4_gb, reference_gb = predicted_gpu_gb.get(nf4["run_id"]), predicted_gpu_gb.get(reference["run_id"])
    if nf4_gb is None or reference_gb is None or pd.isna(nf4_gb) or pd.isna(reference_gb):
        return untested(claim, question, "GPU measurement (CPU RSS cannot test a GPU-memory claim) and no "
                         "predicted GPU memory")  # fmt: skip
    saved = 1 - nf4_gb / reference_gb
    answer = (SUPPORTED if 0.4 <= saved <= 0.6 else CONTRADICTED) + " (predicted)"
    return Claim(claim, question, answer, f"{against}: {_saving(saved)} predicted GPU memory (planner: "
                 f"{nf4_gb:.2f} vs {reference_gb:.2f} GB); measured on a CPU ({memory_text}), which cannot test a "
                 "GPU-memory claim")  # fmt: skip


def _saving(saved: float) -> str:
    return f"{abs(100 * saved):.0f}% {'less' if saved >= 0 else 'more'}"


def reference_claims(
    tables: dict[str, pd.DataFrame],
    judge: Judge,
    settings: FindingSettings,
    memory_text: str,
    predicted_gpu_gb: dict[str, float] | None = None,
) -> list[Claim]:
    """`predicted_gpu_gb`: the planner's predicted GPU memory per run, for memory claims on a CPU study."""
    return [
        *rank_claims(tables.get("rank"), judge, settings),
        *module_claims(tables.get("modules"), judge),
        *quantization_claims(tables.get("quantization"), judge, memory_text, predicted_gpu_gb),
        full_claim(tables.get("full_finetuning"), judge),
    ]


def full_claim(shares: pd.DataFrame | None, judge: Judge, claimed_share: float = 0.9) -> Claim:
    """Share of full fine-tuning's improvement >= 90 % is, with base and full fixed, the best adapter's
    perplexity at most full's + 10 % of (base - full): a one-sided test against full fine-tuning."""
    claim = "LoRA reaches about 90% of full fine-tuning."
    question = "Does the best LoRA run recover at least 90% of full fine-tuning's perplexity improvement?"
    lora = shares[shares["method"] == LORA].dropna(subset=["share_of_full_pct"]) if shares is not None else None
    if lora is None or lora.empty:
        return untested(claim, question, "full fine-tuning run beside LoRA runs and an unquantized base model")
    best = lora.iloc[0]
    base, full = shares.attrs["base_perplexity"], shares.attrs["full_perplexity"]
    threshold = (1 - claimed_share) * (base - full) / full
    result = judge.compare(best["run_id"], shares.attrs["full_id"], "perplexity", threshold, len(lora))  # best of k
    answer = claim_answer(result, threshold, below_is_claimed=True) if result else INCONCLUSIVE
    evidence = (
        f"{best['run_id']} recovers {best['share_of_full_pct']:.0f}% of {shares.attrs['full_id']}'s improvement over "
        f"{shares.attrs['base_id']}; at least {claimed_share:.0%} means a perplexity change against full "
        f"fine-tuning of at most {100 * threshold:+.1f}%: " + (one_sided(result) if result else "no per-row scores")
    )
    return Claim(claim, question, answer, evidence)


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    runs = study.runs
    predicted = dict(zip(runs["run_id"], runs["plan_predicted_cuda_gb"], strict=True)) \
        if "plan_predicted_cuda_gb" in runs else {}  # fmt: skip
    claims = reference_claims(study.tables, study.judge, study.settings, study.memory_text, predicted)
    return {"reference_claims": pd.DataFrame([claim.to_dict() for claim in claims])}


QUESTION = Question(
    anchor="reference-claims",
    title="The reference study's claims, checked",
    tables=tables,
    intro=(
        "Each claim of the reference write-up, restated as a question and answered from this study's runs "
        "(supported / contradicted / inconclusive / not tested); its numbers are not expected values here."
    ),
    prose_tables=("reference_claims",),
    answered_last=True,
)
