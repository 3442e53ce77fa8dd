"""Downstream scores from EleutherAI's lm-evaluation-harness, on the model the study itself loaded.

Two kinds of task:
- local: the study's own exact-answer validation prompts (the rows its own
  exact-match accuracy scores), written as lm-eval task files under results/
  so the real harness runs with no network. One task per answer family, and a
  group of them all, `lora_study_exact`.
- standard: any task lm-eval knows (arc_easy, hellaswag, mmlu_...). Their data
  is fetched once on the submitting machine (rule lm_eval_tasks); compute jobs
  read it from the datasets cache.

Local prompts are the exact prompt text the study trains and evaluates on
(chat template already applied), so lm-eval's greedy answers and the study's
own are answers to the same tokens; standard tasks get the tokenizer's chat
template when the study uses one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from lora_study.core.errors import UserError
from lora_study.core.io import atomic_path, write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lora_study")

LOCAL_PREFIX = "lora_study_"
LOCAL_GROUP = f"{LOCAL_PREFIX}exact"
# Metrics read as a task's headline score, in order of preference.
PRIMARY_METRICS = ("exact_match", "acc_norm", "acc", "f1", "bleu")
# task: the lm-eval task that scored the document; configured_task: the task (or group) of evaluation.lm_eval.tasks
# it belongs to, so a group's documents can be paired across runs.
SAMPLE_COLUMNS = ("configured_task", "task", "doc_id", "row", "metric", "score", "response")
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr of non-mean metrics; mean metrics have a closed form
RANDOM_SEED = 1234


class TaskError(UserError):
    """An lm-eval task cannot be used; the message names it."""


def is_local(task: str) -> bool:
    return task.startswith(LOCAL_PREFIX)


def local_task_name(family: str) -> str:
    return f"{LOCAL_PREFIX}{family}"


@dataclass(frozen=True)
class LmEvalSettings:
    """evaluation.lm_eval from the config."""

    tasks: tuple[str, ...]
    num_fewshot: int
    limit: int | float | None
    batch_size: int

    @classmethod
    def from_config(cls, block: dict[str, Any]) -> LmEvalSettings:
        limit = block.get("limit")
        # lm-eval reads a limit below 1 as a fraction of each task, else as a document count.
        limit = int(limit) if limit is not None and limit >= 1 else limit
        return cls(tuple(block["tasks"]), block["num_fewshot"], limit, block["batch_size"])

    @property
    def local_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if is_local(t))

    @property
    def standard_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if not is_local(t))


# The task file of one answer family. Answers are stored normalised; the filter
# normalises each generated answer with the study's own rule (first line,
# whitespace collapsed, trailing period dropped), so lm-eval's exact_match is
# the study's exact match.
TASK_TEMPLATE = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_new_tokens}
filter_list:
  - name: normalized
    filter:
      - function: custom
        filter_fn: !function utils.normalize
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GROUP_TEMPLATE = """\
group: {group}
task: [{tasks}]
aggregate_metric_list:
  - metric: exact_match
    filter_list: [normalized]
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""

UTILS_SOURCE = '''\
"""Written by the LoRA study: its own answer normalisation as an lm-eval filter."""

from lora_study.measure.evaluate import normalize_answer


def normalize(resps, docs):
    return [[normalize_answer(text) for text in group] for group in resps]
'''


def local_task_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the configured local tasks, decidable before any job runs (else None).

    Local tasks are the exact-answer rows evaluation.exact_match_examples selects; with generated data
    their families are known now (a user data set's families are checked once it is prepared).
    """
    from lora_study.prepare.data import GENERATED_SOURCE
    from lora_study.prepare.datagen import FAMILIES

    local = [t for t in config["evaluation"]["lm_eval"]["tasks"] if is_local(t)]
    if not local:
        return None
    if config["evaluation"]["exact_match_examples"] == 0:
        return (f"evaluation.lm_eval.tasks: {local} score the exact-answer prompts evaluation.exact_match_examples "
                "selects, and it is 0")  # fmt: skip
    if config["dataset"]["source"] != GENERATED_SOURCE:
        return None
    known = [LOCAL_GROUP, *(local_task_name(family) for family in FAMILIES)]
    unknown = [t for t in local if t not in known]
    if unknown:
        return f"evaluation.lm_eval.tasks: {unknown} are not local tasks of the generated data; local tasks: " + (
            ", ".join(known)
        )
    return None


def write_local_tasks(
    validation_rows: list[dict[str, Any]],
    scored_indices: list[int],
    tokenizer,
    max_new_tokens: int,
    out_dir: Path,
) -> dict[str, Any]:
    """One lm-eval task per answer family over the scored validation rows, and their group.

    Each document keeps its validation row number, so lm-eval's per-document
    score pairs with the study's own exact-match hit on that row.
    """
    from lora_study.measure.evaluate import normalize_answer

    by_family: dict[str, list[dict[str, Any]]] = {}
    for index in scored_indices:
        row = validation_rows[index]
        prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]], skip_special_tokens=False)
        document = {"row": index, "prompt": prompt, "answer": normalize_answer(row["answer"])}
        by_family.setdefault(row["family"], []).append(document)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data").mkdir(exist_ok=True)
    names = []
    for family, documents in sorted(by_family.items()):
        name = local_task_name(family)
        data_path = out_dir / "data" / f"{family}.jsonl"
        with atomic_path(data_path) as tmp:
            tmp.write_text("".join(json.dumps(d) + "\n" for d in documents))
        data = json.dumps(str(data_path.resolve()))
        task_text = TASK_TEMPLATE.format(name=name, data=data, max_new_tokens=max_new_tokens)
        (out_dir / f"{name}.yaml").write_text(task_text)
        names.append(name)
    if names:
        (out_dir / f"{LOCAL_GROUP}.yaml").write_text(GROUP_TEMPLATE.format(group=LOCAL_GROUP, tasks=", ".join(names)))
    (out_dir / "utils.py").write_text(UTILS_SOURCE)
    return {"group": LOCAL_GROUP if names else None, "tasks": names,
            "documents": {n: len(by_family[n.removeprefix(LOCAL_PREFIX)]) for n in names}}  # fmt: skip


def check_tasks(settings: LmEvalSettings, local_manifest: dict[str, Any], task_dir: Path) -> dict[str, int]:
    """Every configured task resolves (standard ones fetch their data now); documents per task.

    Runs on the machine that submits the jobs, which may be the only one with network.
    """
    known_local = {local_manifest.get("group"), *local_manifest["tasks"]} - {None}
    unknown_local = [t for t in settings.local_tasks if t not in known_local]
    if unknown_local:
        available = ", ".join(sorted(known_local)) or "none: the validation split has no exact-answer rows"
        raise TaskError(f"evaluation.lm_eval.tasks: {unknown_local} are not local tasks of this data; "
                        f"available: {available}")  # fmt: skip
    counts = {t: local_manifest["documents"].get(t, sum(local_manifest["documents"].values()))
              for t in settings.local_tasks}  # fmt: skip
    if settings.standard_tasks:
        counts.update(_fetch_standard(settings.standard_tasks, task_dir))
    return counts


def _fetch_standard(tasks: tuple[str, ...], task_dir: Path) -> dict[str, int]:
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(task_dir))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise TaskError(f"evaluation.lm_eval.tasks: lm-eval {lm_eval_version()} knows no task {unknown}; "
                        "`lm-eval ls tasks` lists them")  # fmt: skip
    try:
        task_dict = get_task_dict(list(tasks), manager)
    except Exception as error:  # network, gated data set, missing builder
        raise TaskError(f"evaluation.lm_eval.tasks: could not load the data of {list(tasks)}: {error}") from error
    return {name: len(task.eval_docs) for name, task in _leaf_tasks(task_dict).items()}


def _leaf_tasks(task_dict: dict) -> dict[str, Any]:
    """Tasks of a (possibly nested) lm-eval task dict, by name."""
    leaves = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            leaves.update(_leaf_tasks(value))
        else:
            leaves[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return leaves


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def evaluate_tasks(
    model,
    tokenizer,
    settings: LmEvalSettings,
    task_dir: Path,
    chat_template: bool,
    mixed_precision_dtype,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """lm-eval on the already-loaded (quantized, adapted) model: score rows and per-document scores.

    Local tasks get their prompts verbatim (already templated, tokenized as the
    study did); standard tasks get the chat template when the study uses one.
    """
    scores, samples = [], []
    passes = (
        (settings.local_tasks, False, False if chat_template else None),
        (settings.standard_tasks, chat_template, None),
    )
    for tasks, apply_template, add_bos in passes:
        if not tasks:
            continue
        log.info("lm-eval %s on %s (%d-shot, limit %s)", lm_eval_version(), ", ".join(tasks),
                 settings.num_fewshot, settings.limit)  # fmt: skip
        results = _simple_evaluate(model, tokenizer, settings, tasks, task_dir, apply_template, add_bos,
                                   mixed_precision_dtype)  # fmt: skip
        scores += task_scores(results, tasks)
        samples.append(sample_scores(results, tasks))
    frame = pd.concat(samples, ignore_index=True) if samples else pd.DataFrame(columns=list(SAMPLE_COLUMNS))
    return fill_missing_stderr(scores, frame), frame


def fill_missing_stderr(scores: list[dict[str, Any]], samples: pd.DataFrame) -> list[dict[str, Any]]:
    """Where lm-eval gives no standard error (a group with a one-document subtask pools none), the
    standard error of the mean over the scored documents, as lm-eval computes it for a task."""
    for row in scores:
        row["stderr_source"] = "lm-eval" if row["stderr"] is not None else ""
        if row["stderr"] is not None:
            continue
        values = samples[(samples["configured_task"] == row["task"]) & (samples["metric"] == row["metric"])]["score"]
        if len(values) > 1:
            row["stderr"] = float(values.std(ddof=1) / len(values) ** 0.5)
            row["stderr_source"] = "per-document"
    return scores


def _simple_evaluate(model, tokenizer, settings, tasks, task_dir, apply_template, add_bos, mixed_precision_dtype):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
                   add_bos_token=add_bos, mixed_precision_dtype=mixed_precision_dtype)  # fmt: skip
    return lm_eval.simple_evaluate(
        model=wrapper,
        tasks=list(tasks),
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        task_manager=TaskManager(include_path=str(task_dir)),
        apply_chat_template=apply_template,
        log_samples=True,
        bootstrap_iters=BOOTSTRAP_ITERS,
        random_seed=RANDOM_SEED,
        numpy_random_seed=RANDOM_SEED,
        torch_random_seed=RANDOM_SEED,
        fewshot_random_seed=RANDOM_SEED,
    )


def task_scores(results: dict[str, Any], tasks: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per configured task and metric: value, lm-eval's standard error, documents scored."""
    rows = []
    for task in tasks:
        entry = results["results"].get(task)
        if entry is None:
            raise TaskError(f"lm-eval returned no result for task {task!r}")
        samples = results.get("n-samples", {}).get(task, {})
        documents = samples.get("effective") or entry.get("sample_len") or _group_size(results, task)
        for key, value in entry.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = entry.get(f"{metric}_stderr,{filter_name}")
            rows.append({
                "task": task, "metric": metric, "filter": filter_name, "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "documents": int(documents or 0), "primary": False,
            })  # fmt: skip
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        for metric in PRIMARY_METRICS:
            chosen = [r for r in task_rows if r["metric"] == metric]
            if chosen:
                chosen[0]["primary"] = True
                break
        else:
            if task_rows:
                task_rows[0]["primary"] = True
    return rows


def _group_size(results: dict[str, Any], group: str) -> int:
    """Documents of every leaf task in `group`, nested groups included."""
    return sum(results.get("n-samples", {}).get(leaf, {}).get("effective", 0) for leaf in leaf_tasks(results, group))


def leaf_tasks(results: dict[str, Any], name: str) -> list[str]:
    """The tasks that scored documents for `name`: itself, or every task below it when it is a group."""
    members = results.get("group_subtasks", {}).get(name) or []
    return [leaf for member in members for leaf in leaf_tasks(results, member)] if members else [name]


def configured_tasks(results: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, str]:
    """Each leaf task lm-eval ran, mapped to the configured task or group it is part of."""
    return {leaf: task for task in tasks for leaf in leaf_tasks(results, task)}


def sample_scores(results: dict[str, Any], tasks: tuple[str, ...]) -> pd.DataFrame:
    """Every scored document: configured task, task, doc_id, validation row (local tasks), metric, score."""
    owner = configured_tasks(results, tasks)
    records = []
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            row = sample["doc"].get("row") if is_local(task) else None
            # A local task's answer as scored (after the normalising filter), to set beside the study's own.
            response = _first_text(sample.get("filtered_resps")) if is_local(task) else None
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, (int, float)):
                    records.append((owner.get(task, task), task, sample["doc_id"], row, metric, float(value), response))
    return pd.DataFrame.from_records(records, columns=list(SAMPLE_COLUMNS))


def _first_text(value: Any) -> str | None:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _scores_or_oom(record: dict[str, Any], load, tokenizer, settings: LmEvalSettings, task_dir: Path,
                   apply_template: bool, autocast, cap: tuple[float | None, torch.device | None] = (None, None),
                   ) -> tuple[list[dict[str, Any]], pd.DataFrame]:  # fmt: skip
    """lm-eval's scores; out of memory at the configured batch size is tried once more at half of it, and a
    second one is recorded (record["status"] = "oom", what failed in record["oom"]), not raised. `cap`: the
    memory cap (GB, device) each part runs under."""
    from dataclasses import replace

    from lora_study.training.failures import STATUS_OOM, oom_as_data

    if cap[0] is not None:  # imported before the cap (see memory_cap)
        import lm_eval.models.huggingface
        import lm_eval.tasks  # noqa: F401

    attempt: dict[str, Any] = {}
    with oom_as_data(attempt, "load", *cap):
        model = load()
    batches = [settings.batch_size] + ([settings.batch_size // 2] if settings.batch_size > 1 else [])
    for batch in batches if "oom" not in attempt else []:
        with oom_as_data(attempt, f"lm-eval at batch {batch}", *cap):
            return evaluate_tasks(model, tokenizer, replace(settings, batch_size=batch), task_dir, apply_template,
                                  autocast)  # fmt: skip
    record.update(status=STATUS_OOM, oom=attempt["oom"])
    return [], pd.DataFrame(columns=list(SAMPLE_COLUMNS))


def run_downstream(
    run,
    settings: LmEvalSettings,
    compute_settings: dict[str, Any],
    manifest: dict[str, Any],
    template: str,
    adapter_dir: Path | None,
    task_dir: Path,
    scores_path: Path,
    samples_path: Path,
    threads: int,
    train_status: str,
) -> dict[str, Any]:
    """lm-eval on one run (or base model) loaded exactly as rule evaluate loads it."""
    import time

    from lora_study.core.gpu_slots import job_environment
    from lora_study.core.metrics import STATUS_OK
    from lora_study.measure.evaluate import inference_setup, load_run_model
    from lora_study.training.loading import load_tokenizer
    from lora_study.training.precision import quiet_int8_casts

    start = time.perf_counter()
    record: dict[str, Any] = {"run_id": run.run_id, "status": train_status, "lm_eval_version": lm_eval_version(),
                              "num_fewshot": settings.num_fewshot, "limit": settings.limit, "scores": []}  # fmt: skip
    samples = pd.DataFrame(columns=list(SAMPLE_COLUMNS))
    if train_status == STATUS_OK:
        gpu_slot, device, capability, recipe = inference_setup(run, compute_settings, threads)
        log.info("lm-eval on %s (%s); recipe: %s", run.run_id, capability.summary(), recipe.describe())
        tokenizer, _ = load_tokenizer(manifest)
        with quiet_int8_casts():
            scores, samples = _scores_or_oom(record, lambda: load_run_model(run, recipe, manifest, compute_settings,
                                                                            adapter_dir, device),
                                             tokenizer, settings, task_dir, template != "alpaca",
                                             recipe.torch_compute_dtype if recipe.autocast else None,
                                             (compute_settings.get("memory_limit_gb"), device))  # fmt: skip
        record.update(scores=scores, device=device.type, compute_dtype=recipe.compute_dtype,
                      capability=capability.to_dict(), environment=job_environment(gpu_slot))  # fmt: skip
        for row in scores:
            if row["primary"]:
                log.info("%s %s: %.4f (stderr %s)", row["task"], row["metric"], row["value"], row["stderr"])
    else:
        log.info("%s was not trained (status %s): no downstream scores", run.run_id, train_status)
    record["wall_s"] = time.perf_counter() - start
    with atomic_path(samples_path) as tmp:
        samples.to_csv(tmp, index=False)
    write_json(scores_path, record)
    return record
