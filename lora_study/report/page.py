"""The findings report: every question's tables, charts and sentences, as Markdown and as one self-contained
HTML page (Vega libraries inlined, no network needed). The page knows no question by name: it lays out, in
registry order, what each question (lora_study.questions.QUESTIONS) answered."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lora_study.analysis.runs import memory_axis_title, memory_label, prepare, with_own_intervals
from lora_study.core.formats import quantization_label, recipe_text_rows
from lora_study.core.io import atomic_path
from lora_study.report.question import (
    Answer,
    Deployment,
    FindingSettings,
    Question,
    Study,
    answer,
    definitions,
)
from lora_study.report.style import Style, save_chart
from lora_study.stats.verdicts import Judge, evidence_from_examples
from lora_study.study.methods import DESCRIPTIONS

log = logging.getLogger("lora_study")


@dataclass
class StudyContext:
    """What the methods section reports about how the numbers were made."""

    manifest: dict[str, Any]
    data_summary: dict[str, Any]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    measurement: dict[str, Any] | None = None


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g")


def write_tables(answers: list[Answer], out_dir: Path, memory_text: str) -> None:
    """Every derived table as CSV and as Markdown under its title."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for answered in answers:
        for name, frame in answered.tables.items():
            frame.to_csv(out_dir / f"{name}.csv", index=False)
            (out_dir / f"{name}.md").write_text(
                f"# {answered.question.table_title(name)}\n\nMemory: {memory_text}.\n\n" + _markdown(frame) + "\n"
            )


AUTO_TEXT = " (resolved per job from the device: bf16 where it is native, else fp16 on CUDA, fp32 on CPU)"


def methods_lines(context: StudyContext, study: Study, questions: Sequence[Question]) -> list[str]:
    settings, memory_text, runs = study.settings, study.memory_text, study.table
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
        *[line for question in questions for line in question.method_lines(study)],
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
    lines += [f"- {name}: {text.format(**formats)}" for name, text in definitions(questions).items()]
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
    """One question's part of the page: its charts beside its tables."""

    question: Question
    charts: list[str]
    tables: dict[str, pd.DataFrame]

    @property
    def anchor(self) -> str:
        return self.question.anchor

    @property
    def title(self) -> str:
        return self.question.title

    def table_heading(self, name: str) -> str | None:
        """A table's own heading, unless it is the section's only table and shares its title."""
        title = self.question.table_title(name)
        return title if len(self.tables) > 1 or title != self.title else None


def page_sections(answers: list[Answer], chart_names: dict[str, list[str]]) -> list[Section]:
    """One section per question that has a table or a chart to show, in registry order."""
    sections = [Section(a.question, chart_names.get(a.question.anchor, []), a.tables) for a in answers]
    return [section for section in sections if section.charts or section.tables]


def _contents(sections: list[Section]) -> list[tuple[str, str]]:
    """(anchor, heading) of every part of the page after the headline."""
    return [*((s.anchor, s.title) for s in sections), ("methods-and-definitions", "Methods and definitions")]


def render_markdown(findings: list[str], sections: list[Section], methods: list[str], memory_text: str) -> str:
    """The page as Markdown: headline, contents, each chart above the tables it summarises, methods last."""
    parts = ["# LoRA efficiency study: findings", "", "## Headline findings", ""]
    parts += [f"- {sentence}" for sentence in findings]
    parts += ["", "## Contents", ""]
    parts += [f"- [{title}](#{anchor})" for anchor, title in _contents(sections)]
    parts += ["", f"Memory columns: {memory_text}.", ""]
    for section in sections:
        parts += [f'<a id="{section.anchor}"></a>', "", f"## {section.title}", ""]
        if section.question.intro:
            parts += [section.question.intro, ""]
        for chart in section.charts:
            parts += [f"![{chart}](../charts/{chart}.svg)", "", f"*{section.question.caption(chart)}*", ""]
        for name, frame in section.tables.items():
            if heading := section.table_heading(name):
                parts += [f"### {heading}", ""]
            parts += [_markdown(frame), ""]
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


def _html_section(section: Section) -> list[str]:
    body = [f'<section id="{section.anchor}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.question.intro:
        body += [f"<p>{html.escape(section.question.intro)}</p>"]
    body += ['<div class="pair">']
    for chart in section.charts:
        body += [f'<figure><div class="chart" id="chart-{chart}"></div>',
                 f"<figcaption>{html.escape(section.question.caption(chart))}</figcaption></figure>"]  # fmt: skip
    body += ['<div class="tables">']
    for name, frame in section.tables.items():
        if heading := section.table_heading(name):
            body += [f"<h3>{html.escape(heading)}</h3>"]
        prose = name in section.question.prose_tables
        body += [frame.to_html(index=False, na_rep="", classes="prose") if prose else _html_table(frame)]
    body += ["</div></div></section>"]
    return body


def render_html(
    findings: list[str],
    sections: list[Section],
    specs: dict[str, dict[str, Any]],
    methods: list[str],
    memory_text: str,
    vega_bundle: str,
) -> str:
    """One page; every chart is drawn by the inlined Vega libraries, offline."""
    body = ["<h1>LoRA efficiency study: findings</h1>", "<h2>Headline findings</h2>", "<ul>"]
    body += [f"<li>{html.escape(s)}</li>" for s in findings]
    body += ["</ul>", "<nav><h2>Contents</h2><ol>"]
    body += [f'<li><a href="#{anchor}">{html.escape(title)}</a></li>' for anchor, title in _contents(sections)]
    body += ["</ol></nav>", f"<p>Memory columns: {html.escape(memory_text)}.</p>"]
    for section in sections:
        body += _html_section(section)
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


def ask(
    questions: Sequence[Question],
    table: pd.DataFrame,
    settings: FindingSettings,
    judge: Judge | None = None,
    curves: pd.DataFrame | None = None,
    anatomy: pd.DataFrame | None = None,
    deployment: Deployment | None = None,
) -> tuple[Study, list[Answer]]:
    """The study as the questions read it, and what each answered (in `questions`' order)."""
    runs = prepare(table)
    study = Study(
        table=table,
        runs=runs,
        settings=settings,
        judge=judge or Judge({}),
        memory_text=memory_label(runs),
        curves=curves if curves is not None else pd.DataFrame(),
        anatomy=anatomy,
        deployment=deployment or Deployment(),
    )
    return study, answer(study, questions)


def build_report(
    questions: Sequence[Question],
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
    general: pd.DataFrame | None = None,
) -> list[str]:
    """Ask every question; write the derived tables, the charts and the report; return the headline findings.

    `examples` (results/tables/examples.csv) holds every run's per-row scores: the verdicts' evidence;
    `general` (results/tables/general_examples.csv) the same on general text (what each run forgets);
    `anatomy` (results/tables/anatomy.csv) every trained layer's update spectrum.
    """
    import vl_convert

    judge = Judge(evidence_from_examples(examples) if examples is not None else {},
                  general=evidence_from_examples(general) if general is not None and len(general) else {})  # fmt: skip
    study, answers = ask(questions, table, settings, judge, curves, anatomy, deployment)
    findings = [sentence for answered in answers for sentence in answered.findings]
    with atomic_path(tables_dir) as tmp:
        write_tables(answers, tmp, study.memory_text)
    # The charts' runs carry their own intervals; the questions read the runs without them (a copy).
    style = Style.of(with_own_intervals(study.runs.copy(), judge), memory_axis_title(study.runs))
    charts, chart_names = {}, {}
    for answered in answers:
        drawn = {name: chart for name, chart in answered.question.charts(study, style).items() if chart is not None}
        charts.update(drawn)
        chart_names[answered.question.anchor] = list(drawn)
    with atomic_path(charts_dir) as tmp:
        tmp.mkdir()
        for name, chart in charts.items():
            save_chart(chart, tmp, name)
            log.info("chart %s", name)
    sections = page_sections(answers, chart_names)
    methods = methods_lines(context, study, questions)
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(render_markdown(findings, sections, methods, study.memory_text))
    specs = {name: chart.to_dict() for name, chart in charts.items()}
    bundle = vl_convert.javascript_bundle()
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(findings, sections, specs, methods, study.memory_text, bundle))
    return findings
