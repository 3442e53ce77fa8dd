"""The findings report: derived tables, charts and sentences, as Markdown and as
one self-contained HTML page (Vega libraries inlined, no network needed)."""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lora_study.core.formats import quantization_label, recipe_text_rows
from lora_study.core.io import atomic_path
from lora_study.questions.axes import MATRIX_PREFIX, axis_tables, best_learning_rate_finding, matrix_title
from lora_study.questions.claims import reference_claims
from lora_study.questions.deployment_tables import deployment_method_lines, deployment_report, oom_finding
from lora_study.questions.findings import (
    DEFINITIONS,
    FindingSettings,
    all_tables,
    headline_findings,
    memory_axis_title,
    memory_label,
    prepare,
    with_own_intervals,
)
from lora_study.questions.method_tables import (
    anatomy_finding,
    coverage_finding,
    full_share_finding,
    method_tables,
    methods_finding,
)
from lora_study.report.captions import chart_caption
from lora_study.report.charts import build_charts, heatmap_name, save_chart
from lora_study.stats.verdicts import Judge, comparisons_table, evidence_from_examples
from lora_study.study.methods import DESCRIPTIONS

log = logging.getLogger("lora_study")

TABLE_TITLES: dict[str, str] = {
    "rank": "Rank sweep",
    "modules": "Target modules",
    "quantization": "Quantization",
    "base_quantization": "Cost of quantizing the base model (no adapter)",
    "diminishing_returns": "Diminishing returns per rank step",
    "time_memory": "Time and memory",
    "pareto_memory": "Pareto set: peak memory vs perplexity",
    "pareto_time": "Pareto set: training time vs perplexity",
    "decision": "Which configuration for my memory budget",
    "memory_plan": "Memory plan: predicted vs measured peak memory",
    "methods": "LoRA variants against plain LoRA",
    "full_finetuning": "Share of full fine-tuning's improvement (against the unquantized base model)",
    "anatomy": "Adapter anatomy: effective rank of each update per module group",
    "downstream": "Downstream tasks (lm-evaluation-harness) against the base model",
    "downstream_agreement": "lm-eval's exact match beside the study's own, on the same prompts",
    "merge_check": "Merge check: perplexity of each way of merging, against the unmerged adapter",
    "serving": "What each configuration costs to serve",
    "reference_claims": "The reference study's claims, checked",
    "comparisons": "Every verdict: the change against its reference and the interval it rests on",
}
CLAIMS_INTRO = (
    "Each claim of the reference write-up, restated as a question and answered from this study's runs "
    "(supported / contradicted / inconclusive / not tested); its numbers are not expected values here."
)


@dataclass
class StudyContext:
    """What the methods section reports about how the numbers were made."""

    manifest: dict[str, Any]
    data_summary: dict[str, Any]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    measurement: dict[str, Any] | None = None


def table_title(name: str) -> str:
    """The heading of a derived table (axis tables and matrices are named after their axes)."""
    if name.startswith(MATRIX_PREFIX):
        return matrix_title(name)
    if name.startswith("training_"):
        return f"Training setting swept: {name.removeprefix('training_')}"
    return TABLE_TITLES[name]


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path, memory_text: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(out_dir / f"{name}.csv", index=False)
        (out_dir / f"{name}.md").write_text(
            f"# {table_title(name)}\n\nMemory: {memory_text}.\n\n" + _markdown(frame) + "\n"
        )


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g")


AUTO_TEXT = " (resolved per job from the device: bf16 where it is native, else fp16 on CUDA, fp32 on CPU)"


def methods_lines(context: StudyContext, settings: FindingSettings, memory_text: str, runs: pd.DataFrame) -> list[str]:
    manifest, data, training = context.manifest, context.data_summary, context.training
    column = "capability.summary" if "capability.summary" in runs else "device_name"
    devices = "; ".join(sorted(set(runs[column].dropna()))) if column in runs else "unknown"
    skip = (context.measurement or {}).get("skip_first_steps", 2)
    lines = [
        f"Model: {manifest['source']} ({manifest['model_type']}, {manifest['num_parameters']:,} parameters, "
        f"{manifest['num_layers']} layers).",
        f"Data: {data['source']}, template {data['template']}, {data['train_examples']} training and "
        f"{data['validation_examples']} validation examples (max {data['max_length']} tokens; "
        f"{data['rows_dropped_too_long']} longer rows dropped).",
        f"Training (defaults): {training['max_steps'] or ''} steps"
        f"{'' if training['max_steps'] else ' over ' + str(training['epochs']) + ' epochs'}, batch "
        f"{training['batch_size']} x {training['gradient_accumulation_steps']} accumulation, learning rate "
        f"{training['learning_rate']:g} ({training['lr_scheduler']}, {training['warmup_steps']} warmup steps), "
        f"LoRA dropout {training['lora_dropout']}, compute dtype {training['compute_dtype']} for quantized runs"
        f"{AUTO_TEXT if training['compute_dtype'] == 'auto' else ''}, seed {training['seed']}.",
        f"Throughput: tokens/s over the optimizer steps after the first {skip} of each training process "
        "(also after a resume), each step timed on its own (CUDA synchronised), checkpoint saving excluded; "
        "train_wall_s is the sum of all steps, job_wall_s the whole job with loading.",
        f"Evaluation: perplexity over every validation response; accuracy by exact match of greedy answers "
        f"on {context.evaluation['exact_match_examples']} held-out prompts (first line, whitespace normalised).",
        *deployment_method_lines(context.evaluation),
        f"Hardware: {devices}. Memory: {memory_text}.",
        "Precision recipe per quantization (dtypes resolved in each job; see compute_dtype and weight_format "
        "in runs.csv):",
        *[f"- {name}: {text}." for name, text in recipe_text_rows()],
        *_methods_used(runs),
        *_resolved_recipes(runs),
        "Definitions:",
    ]
    formats = {
        "sweet_spot_tolerance": settings.sweet_spot_tolerance,
        "min_relative_gain": settings.min_relative_gain,
    }
    lines += [f"- {name}: {text.format(**formats)}" for name, text in DEFINITIONS.items()]
    return lines


def _methods_used(runs: pd.DataFrame) -> list[str]:
    """What each training method in the study does."""
    used = list(dict.fromkeys(runs["method"].dropna())) if "method" in runs else []
    if used == ["lora"] or not used:
        return []
    return ["Training methods:", *[f"- {DESCRIPTIONS[m]}." for m in used if m in DESCRIPTIONS]]


def _resolved_recipes(runs: pd.DataFrame) -> list[str]:
    """What each configured quantization resolved to in this study's jobs."""
    if "compute_dtype" not in runs or "weight_format" not in runs:
        return []
    seen = runs.dropna(subset=["compute_dtype", "weight_format"])
    labels = [quantization_label(q, bool(dq)) for q, dq in zip(seen["quantization"], seen["double_quant"], strict=True)]
    pairs = sorted(set(zip(labels, seen["weight_format"], seen["compute_dtype"], strict=True)))
    if not pairs:
        return []
    listed = "; ".join(f"{q}: weights {w}, compute {c}" for q, w, c in pairs)
    return [f"Resolved in this study: {listed}."]


@dataclass(frozen=True)
class Section:
    """One part of the findings page: charts beside the tables they summarise."""

    anchor: str
    title: str
    charts: list[str]
    tables: list[str]

    def table_heading(self, name: str) -> str | None:
        """A table's own heading, unless it is the section's only table and shares its title."""
        title = table_title(name)
        return title if len(self.tables) > 1 or title != self.title else None


# The page's sections in reading order: (anchor, heading, charts, tables). Tables and charts of swept axes
# and two-axis matrices, and any table not listed, get sections of their own after these.
SECTION_LAYOUT: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("rank", "Rank: quality, memory and diminishing returns", ("quality_vs_rank", "memory_vs_rank"),
     ("rank", "diminishing_returns")),
    ("modules", "Target modules", ("perplexity_by_modules",), ("modules",)),
    ("quantization", "Quantization", ("quantization",), ("quantization", "base_quantization")),
    ("pareto", "Pareto set and the memory budget", ("memory_vs_perplexity",), ("pareto_memory", "decision")),
    ("time", "Training time", ("time_vs_memory",), ("time_memory", "pareto_time")),
    ("memory", "Where the memory goes", ("memory_breakdown",), ("memory_plan",)),
    ("loss", "Training loss", ("loss_curves",), ()),
    ("methods", "LoRA variants and full fine-tuning", (), ("methods", "full_finetuning")),
    ("anatomy", "Adapter anatomy", ("effective_rank",), ("anatomy",)),
    ("downstream", "Downstream tasks", ("downstream",), ("downstream", "downstream_agreement")),
    ("deployment", "Merging and serving", ("serving",), ("merge_check", "serving")),
    ("verdicts", "Every verdict against its reference", ("comparisons",), ("comparisons",)),
)  # fmt: skip
CLAIMS = "reference_claims"


def page_sections(table_names: list[str], chart_names: list[str]) -> list[Section]:
    """The sections that have something to show, each chart placed once, every table placed once."""
    sections = []
    for anchor, title, charts, tables in SECTION_LAYOUT:
        present = Section(
            anchor, title, [c for c in charts if c in chart_names], [t for t in tables if t in table_names]
        )
        if present.charts or present.tables:
            sections.append(present)
    placed = {t for s in sections for t in s.tables} | {CLAIMS}
    for name in table_names:
        if name in placed:
            continue
        chart = heatmap_name(name)
        charts = [chart] if name.startswith(MATRIX_PREFIX) and chart in chart_names else []
        sections.append(Section(name.replace("_", "-"), table_title(name), charts, [name]))
    shown = {c for s in sections for c in s.charts}
    sections += [Section(f"chart-{c}", c.replace("_", " "), [c], []) for c in chart_names if c not in shown]
    return sections


def _contents(sections: list[Section], has_claims: bool) -> list[tuple[str, str]]:
    """(anchor, heading) of every part of the page after the headline."""
    entries = [(s.anchor, s.title) for s in sections]
    if has_claims:
        entries.append((CLAIMS.replace("_", "-"), TABLE_TITLES[CLAIMS]))
    return [*entries, ("methods-and-definitions", "Methods and definitions")]


def render_markdown(
    findings: list[str],
    tables: dict[str, pd.DataFrame],
    chart_names: list[str],
    methods: list[str],
    memory_text: str,
) -> str:
    """The page as Markdown: headline, contents, each chart above the tables it summarises, methods last."""
    sections = page_sections(list(tables), chart_names)
    parts = ["# LoRA efficiency study: findings", "", "## Headline findings", ""]
    parts += [f"- {sentence}" for sentence in findings]
    parts += ["", "## Contents", ""]
    parts += [f"- [{title}](#{anchor})" for anchor, title in _contents(sections, CLAIMS in tables)]
    parts += ["", f"Memory columns: {memory_text}.", ""]
    for section in sections:
        parts += [f'<a id="{section.anchor}"></a>', "", f"## {section.title}", ""]
        for chart in section.charts:
            parts += [f"![{chart}](../charts/{chart}.svg)", "", f"*{chart_caption(chart)}*", ""]
        for name in section.tables:
            if heading := section.table_heading(name):
                parts += [f"### {heading}", ""]
            parts += [_markdown(tables[name]), ""]
    if CLAIMS in tables:
        parts += ['<a id="reference-claims"></a>', "", f"## {TABLE_TITLES[CLAIMS]}", "", CLAIMS_INTRO, ""]
        parts += [_markdown(tables[CLAIMS]), ""]
    parts += ['<a id="methods-and-definitions"></a>', "", "## Methods and definitions", "", *methods, ""]
    return "\n".join(parts)


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
table.prose td { white-space: normal; text-align: left; }
section { border-top: 1px solid #ddd; margin-top: 2rem; }
.pair { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.pair > figure { margin: 0; }
.pair > .tables { flex: 1 1 480px; min-width: 0; overflow-x: auto; }
figcaption { font-size: 0.85rem; color: #555; max-width: 720px; margin-top: 0.3rem; }
nav ol { columns: 2; font-size: 0.95rem; }
.chart { margin: 0.5rem 0; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format="{:.4g}".format, na_rep="")


def _html_section(section: Section, tables: dict[str, pd.DataFrame]) -> list[str]:
    body = [f'<section id="{section.anchor}">', f"<h2>{html.escape(section.title)}</h2>", '<div class="pair">']
    for chart in section.charts:
        body += [f'<figure><div class="chart" id="chart-{chart}"></div>',
                 f"<figcaption>{html.escape(chart_caption(chart))}</figcaption></figure>"]  # fmt: skip
    body += ['<div class="tables">']
    for name in section.tables:
        if heading := section.table_heading(name):
            body += [f"<h3>{html.escape(heading)}</h3>"]
        body += [_html_table(tables[name])]
    body += ["</div></div></section>"]
    return body


def render_html(
    findings: list[str],
    tables: dict[str, pd.DataFrame],
    specs: dict[str, dict[str, Any]],
    methods: list[str],
    memory_text: str,
    vega_bundle: str,
) -> str:
    """One page; every chart is drawn by the inlined Vega libraries, offline."""
    sections = page_sections(list(tables), list(specs))
    body = ["<h1>LoRA efficiency study: findings</h1>", "<h2>Headline findings</h2>", "<ul>"]
    body += [f"<li>{html.escape(s)}</li>" for s in findings]
    body += ["</ul>", "<nav><h2>Contents</h2><ol>"]
    body += [f'<li><a href="#{anchor}">{html.escape(title)}</a></li>'
             for anchor, title in _contents(sections, CLAIMS in tables)]  # fmt: skip
    body += ["</ol></nav>", f"<p>Memory columns: {html.escape(memory_text)}.</p>"]
    for section in sections:
        body += _html_section(section, tables)
    if CLAIMS in tables:
        body += ['<section id="reference-claims">', f"<h2>{html.escape(TABLE_TITLES[CLAIMS])}</h2>",
                 f"<p>{html.escape(CLAIMS_INTRO)}</p>", tables[CLAIMS].to_html(index=False, na_rep="", classes="prose"),
                 "</section>"]  # fmt: skip
    body += ['<section id="methods-and-definitions"><h2>Methods and definitions</h2>', "<ul>"]
    body += [f"<li>{html.escape(line.lstrip('- '))}</li>" for line in methods]
    body += ["</ul></section>"]
    embeds = "\n".join(
        f"vegaEmbed('#chart-{name}', {json.dumps(spec)}, {{renderer: 'svg', actions: false}}).catch(console.error);"
        for name, spec in specs.items()
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>LoRA efficiency study: findings</title>"
        f"<style>{PAGE_STYLE}</style><script type='text/javascript'>{vega_bundle}</script></head>"
        f"<body>{''.join(body)}<script type='text/javascript'>{embeds}</script></body></html>\n"
    )


@dataclass
class Deployment:
    """What rules downstream and deploy measured, as aggregate wrote it (empty tables when they were off)."""

    downstream: pd.DataFrame | None = None
    samples: pd.DataFrame | None = None
    deploy: pd.DataFrame | None = None
    examples: pd.DataFrame | None = None
    evaluation: dict = field(default_factory=dict)


def study_tables(
    table: pd.DataFrame,
    settings: FindingSettings,
    judge: Judge,
    anatomy: pd.DataFrame | None = None,
    deployment: Deployment | None = None,
) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Every derived table and headline sentence: the fixed axes, any swept axis, methods, anatomy, and
    downstream scores, merge check and serving cost."""
    runs = prepare(table)
    deployment = deployment or Deployment()
    deployed, deployed_findings = deployment_report(
        runs, deployment.downstream, deployment.samples, deployment.deploy, deployment.examples,
        deployment.evaluation, settings,
    )  # fmt: skip
    tables = {
        **all_tables(table, settings, judge),
        **axis_tables(runs),
        **method_tables(runs, judge, settings, anatomy),
        **deployed,
    }
    findings = headline_findings(table, settings, judge, tables)
    extra = [
        best_learning_rate_finding(tables, judge, settings),
        methods_finding(tables.get("methods")),
        full_share_finding(runs, tables.get("full_finetuning"), judge, settings),
        anatomy_finding(tables),
        coverage_finding(runs),
        *deployed_findings,
        oom_finding(deployment.downstream, deployment.deploy, anatomy),
    ]
    # Before the list of runs that did not fit, which closes the headline.
    position = next((i for i, s in enumerate(findings) if s.startswith("Not measured:")), len(findings))
    findings[position:position] = [s for s in extra if s]
    return tables, findings


def build_report(
    table: pd.DataFrame,
    curves: pd.DataFrame,
    context: StudyContext,
    settings: FindingSettings,
    tables_dir: Path,
    charts_dir: Path,
    markdown_path: Path,
    html_path: Path,
    examples: pd.DataFrame | None = None,
    anatomy: pd.DataFrame | None = None,
    deployment: Deployment | None = None,
) -> list[str]:
    """Write derived tables, charts and the report; return the headline findings.

    `examples` (results/tables/examples.csv) holds every run's per-row scores: the verdicts' evidence;
    `anatomy` (results/tables/anatomy.csv) every trained layer's update spectrum.
    """
    import vl_convert

    judge = Judge(evidence_from_examples(examples) if examples is not None else {})
    runs = with_own_intervals(prepare(table), judge)
    memory_text = memory_label(runs)
    tables, findings = study_tables(table, settings, judge, anatomy, deployment)
    predicted = dict(zip(runs["run_id"], runs["plan_predicted_cuda_gb"], strict=True)) \
        if "plan_predicted_cuda_gb" in runs else {}  # fmt: skip
    claims = reference_claims(tables, judge, settings, memory_text, predicted)
    tables["reference_claims"] = pd.DataFrame([claim.to_dict() for claim in claims])
    if judge.records:
        tables["comparisons"] = comparisons_table(judge)
    with atomic_path(tables_dir) as tmp:
        write_tables(tables, tmp, memory_text)
    charts = build_charts(runs, tables, curves, memory_axis_title(runs))
    if "plan_predicted_cpu_gb" in runs and "plan_adapter_weights_gb" not in runs:
        log.warning("no memory breakdown chart: plan.csv predates its terms (snakemake -R plan redraws it)")
    with atomic_path(charts_dir) as tmp:
        tmp.mkdir()
        for name, chart in charts.items():
            save_chart(chart, tmp, name)
            log.info("chart %s", name)
    methods = methods_lines(context, settings, memory_text, table)
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(render_markdown(findings, tables, list(charts), methods, memory_text))
    specs = {name: chart.to_dict() for name, chart in charts.items()}
    bundle = vl_convert.javascript_bundle()
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(findings, tables, specs, methods, memory_text, bundle))
    return findings
