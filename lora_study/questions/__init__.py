"""The report's questions, one module each, in the order the report asks them (its sections and its headline).

Each module's QUESTION (lora_study.report.question.Question) owns its tables, sentences, charts, captions and
definitions. Adding a question to the report = one new module here and its line in QUESTIONS.
"""

from lora_study.questions import (
    adapter_anatomy,
    base_model_cost,
    comparisons,
    diminishing_returns,
    downstream_tasks,
    field_claims,
    forgetting,
    full_finetuning,
    lora_variants,
    memory_budget,
    memory_plan,
    merge_and_serving,
    overview,
    pareto,
    quantization,
    rank,
    rank_for_data,
    reference_claims,
    target_modules,
    training_axes,
    training_loss,
    unmeasured,
)

QUESTIONS = (
    overview.QUESTION,
    rank.QUESTION,
    diminishing_returns.QUESTION,
    target_modules.QUESTION,
    quantization.QUESTION,
    base_model_cost.QUESTION,
    pareto.QUESTION,
    memory_budget.QUESTION,
    memory_plan.QUESTION,
    training_loss.QUESTION,
    training_axes.QUESTION,
    rank_for_data.QUESTION,
    lora_variants.QUESTION,
    full_finetuning.QUESTION,
    forgetting.QUESTION,
    adapter_anatomy.QUESTION,
    downstream_tasks.QUESTION,
    merge_and_serving.QUESTION,
    reference_claims.QUESTION,
    field_claims.QUESTION,
    comparisons.QUESTION,
    unmeasured.QUESTION,
)
