"""What a report question is, what it reads, and the order the report asks its questions in.

A question (one module under lora_study/questions/) owns its tables, its sentences with their verdicts, its charts
and their captions, and the definitions its numbers rest on. The page (lora_study.report.page) knows none of them
by name: it asks every registered question (lora_study.questions.QUESTIONS) in registry order and lays out what
each answers as one section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from lora_study.stats.verdicts import Judge

if TYPE_CHECKING:
    import altair as alt

    from lora_study.report.style import Style


@dataclass(frozen=True)
class FindingSettings:
    """The report's settings (config key `report`)."""

    sweet_spot_tolerance: float = 0.02
    min_relative_gain: float = 0.01
    memory_budgets_gb: tuple[float, ...] = (6, 8, 12, 16, 24, 40, 80)


@dataclass
class Deployment:
    """What rules downstream and deploy measured, as aggregate wrote it (empty tables when they were off)."""

    downstream: pd.DataFrame | None = None
    samples: pd.DataFrame | None = None
    deploy: pd.DataFrame | None = None
    examples: pd.DataFrame | None = None
    evaluation: dict = field(default_factory=dict)


@dataclass
class Study:
    """Everything a question may read. `tables` fills up as the questions answer: a later question reads an
    earlier one's tables (the reference claims read the rank, modules and quantization tables)."""

    table: pd.DataFrame  # results/tables/configs.csv: one row per configuration
    runs: pd.DataFrame  # the same, prepared (lora_study.analysis.runs.prepare)
    settings: FindingSettings
    judge: Judge
    memory_text: str  # how peak memory was measured, for headings ("peak CPU memory (process RSS; ...)")
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    anatomy: pd.DataFrame | None = None
    deployment: Deployment = field(default_factory=Deployment)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def memory_short(self) -> str:
        """'CPU RSS' or 'GPU memory', for sentences."""
        return "CPU RSS" if "CPU" in self.memory_text else "GPU memory"


Tables = Callable[[Study], Mapping[str, "pd.DataFrame | None"]]
Sentences = Callable[[Study], Iterable["str | None"]]
Charts = Callable[[Study, "Style"], Mapping[str, "alt.Chart | None"]]


def _no_tables(study: Study) -> dict[str, pd.DataFrame]:
    return {}


def _no_sentences(study: Study) -> list[str]:
    return []


def _no_charts(study: Study, style: Style) -> dict[str, alt.Chart]:
    return {}


@dataclass(frozen=True)
class Question:
    """One question of the report. Every hook may return nothing: a question the study's runs cannot answer
    leaves no section and no sentence.

    anchor, title: the section's link target and heading.
    tables: the derived tables, by file stem (results/tables/derived/<name>.csv); None values are dropped.
    findings: the headline sentences, read from `study.tables` (None values are dropped).
    charts: Altair charts by file stem (results/charts/<name>.svg), drawn with the report's style.
    captions: one sentence per chart, by stem; a key ending in "__" captions every chart whose stem starts with it.
    titles: a heading per table stem, where it differs from the section's title (`title_of` for stems made at run
      time, such as one table per swept setting).
    definitions: what each derived number means, for the page's methods section.
    method_lines: how the question's numbers were measured, for the same section.
    intro: a paragraph under the heading; prose_tables: tables of sentences, shown wrapped.
    answered_last: asked after every other question has written its sentences (it reads their verdicts).
    """

    anchor: str
    title: str
    tables: Tables = _no_tables
    findings: Sentences = _no_sentences
    charts: Charts = _no_charts
    captions: Mapping[str, str] = field(default_factory=dict)
    titles: Mapping[str, str] = field(default_factory=dict)
    title_of: Callable[[str], str | None] | None = None
    definitions: Mapping[str, str] = field(default_factory=dict)
    method_lines: Callable[[Study], list[str]] = _no_sentences
    intro: str = ""
    prose_tables: tuple[str, ...] = ()
    answered_last: bool = False

    def table_title(self, name: str) -> str:
        dynamic = self.title_of(name) if self.title_of else None
        return self.titles.get(name) or dynamic or self.title

    def caption_key(self, chart: str) -> str | None:
        """The key of `captions` that captions `chart` (its stem, else a "__"-ending prefix); None if none does."""
        if chart in self.captions:
            return chart
        return next((key for key in self.captions if key.endswith("__") and chart.startswith(key)), None)

    def caption(self, chart: str) -> str:
        key = self.caption_key(chart)
        if key is None:
            raise KeyError(f"question {self.anchor!r} has no caption for chart {chart!r}")
        return self.captions[key]


@dataclass
class Answer:
    """What one question answered: its tables and sentences, in its own order."""

    question: Question
    tables: dict[str, pd.DataFrame]
    findings: list[str] = field(default_factory=list)


def _tables_of(question: Question, study: Study) -> dict[str, pd.DataFrame]:
    found = {name: frame for name, frame in question.tables(study).items() if frame is not None}
    study.tables.update(found)
    return found


def _findings_of(question: Question, study: Study) -> list[str]:
    return [sentence for sentence in question.findings(study) if sentence]


def answer(study: Study, questions: Iterable[Question]) -> list[Answer]:
    """Every question's tables, then every question's sentences, in registry order; then the questions that read
    the others' verdicts. (The order is the order verdicts are recorded in: the comparisons table lists them so.)"""
    questions = list(questions)
    first = [question for question in questions if not question.answered_last]
    answers = {question.anchor: Answer(question, _tables_of(question, study)) for question in first}
    for question in first:
        answers[question.anchor].findings = _findings_of(question, study)
    for question in questions:
        if question.answered_last:
            answers[question.anchor] = Answer(question, _tables_of(question, study))
            answers[question.anchor].findings = _findings_of(question, study)
    return [answers[question.anchor] for question in questions]


def chart_captions(questions: Iterable[Question]) -> dict[str, str]:
    """Every question's chart captions by stem, for the Snakemake report's caption template."""
    return {stem: text for question in questions for stem, text in question.captions.items()}


def caption(questions: Iterable[Question], chart: str) -> str:
    """The caption of a chart by its stem, from the question that draws it."""
    for question in questions:
        if question.caption_key(chart) is not None:
            return question.caption(chart)
    raise KeyError(f"no question captions chart {chart!r}")


def definitions(questions: Iterable[Question]) -> dict[str, str]:
    return {name: text for question in questions for name, text in question.definitions.items()}
