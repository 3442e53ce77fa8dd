"""Training settings as axes: one table per swept setting, a matrix (and heatmap) for two axes swept
together, and whether the best learning rate moves with rank."""

from __future__ import annotations

import itertools

import altair as alt
import pandas as pd

from lora_study.analysis.runs import (
    trained_runs,
)
from lora_study.questions.common import (
    measured,
    status_column,
    sweep_slice,
    training_columns,
    with_accuracy,
)
from lora_study.report.question import FindingSettings, Question, Study
from lora_study.report.style import HEIGHT, WIDTH, Style
from lora_study.stats.verdicts import (
    Judge,
    Verdict,
    against_best,
)

# Axes a matrix can pair (beside every training setting), with their readable names.
DESIGN_AXES = {"rank": "rank", "modules_label": "modules", "quant_label": "quantization", "method": "method"}


MATRIX_PREFIX = "matrix__"


MAX_SUBSETS = 4096


def axis_name(column: str) -> str:
    """`training.learning_rate` -> `learning_rate`, `quant_label` -> `quantization`."""
    return DESIGN_AXES.get(column, column.removeprefix("training."))


def training_axis_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per swept training setting (named `training_<key>`): the runs that differ only in it."""
    tables = {}
    for column in training_columns(runs):
        group = sweep_slice(runs, column, ["rank", "alpha", "modules_label", "quant_label"])
        if group is None:
            continue
        group = group.sort_values(column)
        table = pd.DataFrame(
            {
                "run_id": group["run_id"],
                axis_name(column): group[column],
                "rank": group["rank"],
                "modules": group["modules_label"],
                "quantization": group["quant_label"],
                "method": group["method"],
                **measured(group, "perplexity", "accuracy", "peak_memory_gb", "train_wall_s"),
                "status": status_column(group),
            }
        )
        tables[f"training_{axis_name(column)}"] = table[with_accuracy(list(table.columns), table)].reset_index(
            drop=True
        )
    return tables


def complete_block(group: pd.DataFrame, first: str, second: str) -> pd.DataFrame | None:
    """The largest block of `group` where every value of `first` meets every value of `second` (2 x 2 at least).

    A rank grid at one learning rate beside a rank x learning-rate grid leaves
    ranks with one learning rate only: the block drops them instead of the matrix.
    """
    present = set(zip(group[first], group[second], strict=True))
    second_values = list(dict.fromkeys(group[second]))
    best: tuple[list, tuple] | None = None
    # Subsets of the second axis's values (few: they are swept by hand), largest first, with the
    # first-axis values that meet all of them; bounded for axes with very many values.
    subsets = (c for size in range(len(second_values), 1, -1) for c in itertools.combinations(second_values, size))
    for chosen in itertools.islice(subsets, MAX_SUBSETS):
        rows = [a for a in dict.fromkeys(group[first]) if all((a, b) in present for b in chosen)]
        if len(rows) >= 2 and (best is None or len(rows) * len(chosen) > len(best[0]) * len(best[1])):
            best = (rows, chosen)
    if best is None:
        return None
    return group[group[first].isin(best[0]) & group[second].isin(best[1])]


def _matrix_group(trained: pd.DataFrame, first: str, second: str) -> pd.DataFrame | None:
    """The largest complete block of runs that differ only in `first` and `second`."""
    keys = [k for k in [*DESIGN_AXES, "alpha_rule", *training_columns(trained)] if k not in (first, second)]
    best = None
    for _, group in trained.groupby(keys, dropna=False, sort=False):
        block = complete_block(group, first, second) if group[first].nunique() >= 2 else None
        if block is not None and (best is None or len(block) > len(best)):
            best = block
    return best


def matrices(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """For every two axes swept together: perplexity with `first` down and `second` across.

    Named `matrix__<first>__<second>`; the long form (one row per run) is in the table's attrs["cells"].
    """
    trained = trained_runs(runs)
    if trained.empty:
        return {}
    # A matrix needs two values on each axis: axes with one value (most training keys) pair with none.
    axes = [axis for axis in [*DESIGN_AXES, *training_columns(trained)] if trained[axis].nunique(dropna=False) > 1]
    found = {}
    for first, second in itertools.combinations(axes, 2):
        if first == "method" and second.startswith("training."):
            first, second = second, first
        group = _matrix_group(trained, first, second)
        if group is None:
            continue
        cells = pd.DataFrame(
            {
                "run_id": group["run_id"],
                axis_name(first): group[first],
                axis_name(second): group[second],
                **measured(group, "perplexity", "accuracy"),
            }
        )
        matrix = cells.pivot_table(
            index=axis_name(first), columns=axis_name(second), values="perplexity", aggfunc="first", dropna=False
        )
        matrix.columns = [f"{axis_name(second)}={value:g}" if isinstance(value, float) else f"{axis_name(second)}="
                          f"{value}" for value in matrix.columns]  # fmt: skip
        matrix = matrix.reset_index()
        matrix.attrs["cells"] = cells
        matrix.attrs["axes"] = (axis_name(first), axis_name(second))
        found[f"{MATRIX_PREFIX}{axis_name(first)}__{axis_name(second)}"] = matrix
    return found


def matrix_title(name: str) -> str:
    first, second = name.removeprefix(MATRIX_PREFIX).split("__")
    return f"Perplexity: {first} x {second}"


def best_learning_rate_finding(tables: dict[str, pd.DataFrame], judge: Judge, settings: FindingSettings) -> str | None:
    """The best learning rate at each rank, and whether it moves with rank (verdicts, m = every pair of
    learning rates within each rank: each rank's best is picked from them).

    At every rank, each other rank's best learning rate is compared with that
    rank's own best at tolerance sweet_spot_tolerance: *worse* anywhere means
    the best learning rate moves with rank; all *equivalent* means it does not.
    """
    matrix = tables.get(f"{MATRIX_PREFIX}rank__learning_rate")
    if matrix is None:
        return None
    cells = matrix.attrs["cells"].dropna(subset=["perplexity"])
    best = best_per_rank(cells)
    if len(best) < 2:
        return None
    listed = ", ".join(f"rank {int(r)}: {best.loc[r, 'learning_rate']:g}" for r in best.index)
    if best["learning_rate"].nunique() == 1:
        return _shared_best_finding(cells, best, listed, judge, settings)
    results = _judge_pairs(cross_rank_pairs(cells, best), judge, settings, selection_comparisons(cells))
    if results is None:
        return f"Best learning rate per rank: {listed}; whether it moves with rank: not judged (no per-row scores)."
    worse = [(p, r) for p, r in results if r.verdict is Verdict.WORSE]
    if worse:
        (rank, lr, _, _), result = worse[0]
        return (
            f"Best learning rate per rank: {listed}. It moves with rank: at rank {int(rank)}, learning rate {lr:g} "
            f"(best at another rank) is {result.describe()} against that rank's best "
            f"({len(worse)} of {len(results)} such comparisons worse)."
        )
    if all(r.verdict is Verdict.EQUIVALENT for _, r in results):
        return (
            f"Best learning rate per rank: {listed}; it does not detectably move with rank: every rank's best "
            f"learning rate is equivalent at every other rank (tolerance {settings.sweet_spot_tolerance:.0%}, "
            f"{len(results)} comparisons)."
        )
    (rank, lr, _, _), result = next((p, r) for p, r in results if r.verdict is not Verdict.EQUIVALENT)
    return (
        f"Best learning rate per rank: {listed}; whether it moves with rank is inconclusive: at rank {int(rank)}, "
        f"learning rate {lr:g} is {result.describe()} against that rank's best."
    )


def best_per_rank(cells: pd.DataFrame) -> pd.DataFrame:
    """Each rank's lowest-perplexity cell of a rank x learning-rate grid (run_id, rank, learning_rate, ...)."""
    return cells.loc[cells.groupby("rank")["perplexity"].idxmin()].set_index("rank")


def cross_rank_pairs(cells: pd.DataFrame, best: pd.DataFrame) -> list[tuple]:
    """At each rank, every other rank's best learning rate (where it is not this rank's own) against this rank's
    best: (rank, learning rate, candidate run, reference run), each pair once."""
    pairs = []
    for rank in best.index:
        own = best.loc[rank]
        for other in best.index:
            other_lr = best.loc[other, "learning_rate"]
            if other == rank or other_lr == own["learning_rate"]:
                continue
            candidate = cells[(cells["rank"] == rank) & (cells["learning_rate"] == other_lr)]
            if len(candidate):
                pairs.append((rank, other_lr, candidate.iloc[0]["run_id"], own["run_id"]))
    return list(dict.fromkeys(pairs))


def _judge_pairs(pairs: list[tuple], judge: Judge, settings: FindingSettings, m: int) -> list[tuple] | None:
    """Each (rank, learning rate, candidate run, reference run) with its perplexity verdict at m comparisons;
    None when a run has no per-row scores."""
    results = [(p, judge.compare(p[2], p[3], "perplexity", settings.sweet_spot_tolerance, m)) for p in pairs]
    return None if any(result is None for _, result in results) else results


def selection_comparisons(cells: pd.DataFrame) -> int:
    """Each rank's best learning rate is picked from its k cells: every pair within each rank (against_best)."""
    return sum(against_best(k) for k in cells.groupby("rank").size())


def _shared_best_finding(
    cells: pd.DataFrame, best: pd.DataFrame, listed: str, judge: Judge, settings: FindingSettings
) -> str:
    """One learning rate is best at every rank: is it shown better than the others at each rank?

    Every other learning rate at each rank is compared with that rank's best
    (tolerance sweet_spot_tolerance, m = every pair within each rank).
    """
    start = (
        f"Best learning rate per rank: {listed}: the same at every rank "
        f"({len(cells)} runs; {cells['learning_rate'].nunique()} learning rates)"
    )
    pairs = [
        (int(row["rank"]), row["learning_rate"], row["run_id"], best.loc[row["rank"], "run_id"])
        for _, row in cells.iterrows()
        if row["run_id"] != best.loc[row["rank"], "run_id"]
    ]
    results = _judge_pairs(pairs, judge, settings, selection_comparisons(cells))
    if not results:
        return f"{start}; not judged (no per-row scores)."
    worse = [r for _, r in results if r.verdict is Verdict.WORSE]
    if len(worse) == len(results):
        return (
            f"{start}; every other learning rate is worse at every rank ({len(results)} comparisons, tolerance "
            f"{settings.sweet_spot_tolerance:.0%}, {worse[0].sources})."
        )
    (rank, lr, _, _), result = next((p, r) for p, r in results if r.verdict is not Verdict.WORSE)
    return (
        f"{start}, but not shown better than every alternative: at rank {rank}, learning rate {lr:g} is "
        f"{result.describe()} against it ({len(worse)} of {len(results)} comparisons worse)."
    )


def axis_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every swept training setting's table and every two-axis matrix the runs support."""
    return {**training_axis_tables(runs), **matrices(runs)}


def matrix_heatmaps(tables: dict[str, pd.DataFrame]) -> dict[str, alt.Chart]:
    """A heatmap of perplexity per two-axis matrix (one cell per run), the value written in each cell."""
    charts = {}
    for name, matrix in tables.items():
        if "cells" not in matrix.attrs:
            continue
        first, second = matrix.attrs["axes"]
        cells = matrix.attrs["cells"].dropna(subset=["perplexity"]).copy()
        cells[first], cells[second] = cells[first].astype(str), cells[second].astype(str)
        base = alt.Chart(cells).encode(
            x=alt.X(f"{second}:O", title=second.replace("_", " "), sort=None, axis=alt.Axis(labelAngle=0)),
            y=alt.Y(f"{first}:O", title=first.replace("_", " "), sort=None),
        )
        heat = base.mark_rect().encode(
            color=alt.Color("perplexity:Q", title="perplexity", scale=alt.Scale(scheme="viridis", reverse=True)),
            tooltip=["run_id", first, second, alt.Tooltip("perplexity:Q", format=".4g")],
        )
        # Light text on the dark (high-perplexity) end of the scale, dark text elsewhere.
        middle = (cells["perplexity"].min() + cells["perplexity"].max()) / 2
        text = base.mark_text(fontSize=11).encode(
            text=alt.Text("perplexity:Q", format=".3g"),
            color=alt.condition(alt.datum.perplexity > middle, alt.value("white"), alt.value("black")),
        )
        title = f"Perplexity: {first} x {second}"
        charts[heatmap_name(name)] = (heat + text).properties(width=WIDTH, height=HEIGHT, title=title)
    return charts


HEATMAP_PREFIX = "heatmap__"


def heatmap_name(table_name: str) -> str:
    """The chart of a two-axis matrix table (matrix__rank__learning_rate -> heatmap__rank__learning_rate)."""
    return HEATMAP_PREFIX + table_name.removeprefix(MATRIX_PREFIX)


def tables(study: Study) -> dict[str, pd.DataFrame | None]:
    return axis_tables(study.runs)


def findings(study: Study) -> list[str | None]:
    return [best_learning_rate_finding(study.tables, study.judge, study.settings)]


def charts(study: Study, style: Style) -> dict[str, alt.Chart | None]:
    return matrix_heatmaps(study.tables)


def table_title(name: str) -> str | None:
    """Axis tables and matrices are named after their axes."""
    if name.startswith(MATRIX_PREFIX):
        return matrix_title(name)
    if name.startswith("training_"):
        return f"Training setting swept: {name.removeprefix('training_')}"
    return None


QUESTION = Question(
    anchor="training-axes",
    title="Training settings swept",
    tables=tables,
    findings=findings,
    charts=charts,
    captions={HEATMAP_PREFIX: "Perplexity of every cell of a two-axis matrix, the value written in each cell."},
    title_of=table_title,
    definitions={
        "learning_rate_per_rank": "in a rank x learning-rate matrix, the best learning rate of a rank is its "
        "lowest perplexity; at every rank, each other rank's best learning rate is compared with the rank's own "
        "best (tolerance sweet_spot_tolerance, m = every pair of learning rates within each rank, as each rank's best "
        "is picked from them): *worse* anywhere = it moves "
        "with rank.",
    },
)
