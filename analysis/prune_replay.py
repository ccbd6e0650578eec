"""A search's pruning replayed on a study's shipped test-error curves: successive halving, as Ray
Tune's ASHA prunes, judging either one seed's run at a time or a configuration on all its seeds.

    stawm-replay --pruning analysis/results/glimpse_count analysis/results/memory_rates

Every study here ran each configuration on several seeds, a trial per seed. Pruned by ASHA, each of those trials
is judged on its own curve: a configuration loses a seed on one unlucky curve, and can win on one lucky one.
Replayed, for each study (`STRATEGIES`):
- `one seed at a time`: a unit is a run, scored by its own test error (Tune's ASHA over a trial per seed);
- `seeds' mean`: a unit is a configuration, scored by its seeds' mean test error at that epoch (a fused trial
  reporting its seeds' mean, as --fuse-seeds runs them); pruning it stops every seed;
- `seeds' mean, paired`: as the mean, but a configuration below the cut goes on unless it is worse than the
  milestone's leader (lowest mean) on every seed, paired by seed: with 3 seeds, the sign test's one verdict
  (one-sided p = 1/8, the smallest a paired Wilcoxon test can reach with 3 pairs).

The schedule (`Schedule`): ASHA's milestones at grace_period x reduction_factor^k epochs, those before the last
epoch. At each milestone every unit still running is judged together, and goes on when its score is at or below
the 1/reduction_factor quantile of their scores (np.nanpercentile, linear: ASHA's cutoff). ASHA judges a trial
against those that reached the milestone before it, so its cuts depend on the order trials arrive; judging all
at once is the order-free limit of that rule. A NaN score (a diverged run) is the worst.

What a strategy keeps as best: of the configurations with a seed run to the end (all seeds, for the fused
strategies), the lowest mean final test error over the seeds that ran to the end. It is compared with the true
best, the lowest mean over all seeds of every configuration (running everything), by the kept configuration's own
mean over all its seeds as shipped: the same configuration, within one std (ddof=1) of the true best's seeds, within
the 95% t interval of the true best's mean, or outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from stawm import schema

from .replay import NotReplayable, markdown, per_epoch
from .source import ExportedStudy
from .store import swept_fields
from .tables import cell_text

CONFIG, SEED = "config", "seed"  # the levels of a curves frame's index


@dataclass(frozen=True)
class Schedule:
    """ASHA's schedule: the first milestone and the share (1/reduction_factor) that goes on at each."""

    grace_period: int = 1
    reduction_factor: int = 3

    def milestones(self, epochs: int) -> list[int]:
        """grace_period x reduction_factor^k for k = 0, 1, ..., below `epochs` (a milestone at the last epoch
        would save nothing)."""
        out, at = [], self.grace_period
        while at < epochs:
            out.append(at)
            at *= self.reduction_factor
        return out

    def describe(self, epochs: int) -> str:
        return (f"grace period {self.grace_period}, reduction factor {self.reduction_factor}, milestones at epochs "
                f"{', '.join(map(str, self.milestones(epochs))) or 'none'} of {epochs}")


# --- the curves ------------------------------------------------------------------------------------------------

def config_label(run: pd.Series, swept: list[str]) -> str:
    """A configuration as text: its swept fields, `delta=0.2, eta=0.4`."""
    return ", ".join(f"{name}={cell_text(run[name])}" for name in swept)


def error_curves(study: ExportedStudy) -> tuple[pd.DataFrame, pd.Series]:
    """(each run's test error per epoch: index (config, seed), a column per epoch; the run_id of each row).
    NotReplayable when the study has a single configuration or a configuration has a seed twice."""
    runs = study.runs
    swept = swept_fields(runs, study.info)
    if not swept:
        raise NotReplayable("it swept nothing but the seed: no configuration to prune")
    keys = pd.MultiIndex.from_arrays([[config_label(run, swept) for _, run in runs.iterrows()],
                                      runs["seed"].astype(int).to_numpy()], names=[CONFIG, SEED])
    if keys.nunique() < 2 or keys.get_level_values(CONFIG).nunique() < 2:
        raise NotReplayable("a single configuration: nothing to prune")
    if keys.has_duplicates:
        config, seed = keys[keys.duplicated()][0]
        raise NotReplayable(f"{config} has seed {seed} twice")
    run_ids = pd.Series(runs["run_id"].to_numpy(), index=keys)
    errors = per_epoch(study, ())[schema.TEST_ERROR].unstack("epoch")  # (run_id, epoch) -> a row per run
    curves = errors.reindex(run_ids.to_numpy())
    curves.index = keys
    return curves, run_ids


# --- who goes on at a milestone ------------------------------------------------------------------------------

def at_or_below_cut(scores: pd.Series, reduction_factor: int) -> pd.Series:
    """ASHA's cut: True where a score is at or below the 1/reduction_factor quantile of the scores (NaN: worst)."""
    cutoff = np.nanpercentile(scores.to_numpy(dtype=float), 100 / reduction_factor) if scores.notna().any() \
        else math.nan
    return scores.fillna(math.inf) <= cutoff


def seed_means(errors: pd.Series) -> pd.Series:
    """Each configuration's mean over its seeds in `errors`, NaN if one of them has none (a diverged seed: a fused
    trial reporting NaN, never best)."""
    return errors.groupby(level=CONFIG).agg(lambda seeds: seeds.mean(skipna=False))


def by_config(errors: pd.Series) -> pd.DataFrame:
    """A milestone's errors, (config, seed) -> error, as a config x seed table."""
    return errors.unstack(SEED)


def keep_seeds(errors: pd.Series, reduction_factor: int) -> pd.Series:
    """One seed at a time: each run judged by its own error."""
    return at_or_below_cut(errors, reduction_factor)


def keep_means(errors: pd.Series, reduction_factor: int) -> pd.Series:
    """A configuration judged by its seeds' mean."""
    means = seed_means(errors)
    return spread(at_or_below_cut(means, reduction_factor), errors.index)


def keep_paired(errors: pd.Series, reduction_factor: int) -> pd.Series:
    """The mean's cut, but only a configuration worse than the milestone's leader on every seed is pruned."""
    table = by_config(errors).fillna(math.inf)
    means = seed_means(errors)
    leader = table.loc[means.fillna(math.inf).idxmin()]
    beaten_everywhere = (table > leader).all(axis=1) & (table.index != leader.name)
    return spread(at_or_below_cut(means, reduction_factor) | ~beaten_everywhere, errors.index)


def spread(kept: pd.Series, index: pd.MultiIndex) -> pd.Series:
    """A verdict per configuration onto each of its runs."""
    return pd.Series(kept.reindex(index.get_level_values(CONFIG)).to_numpy(dtype=bool), index=index)


STRATEGIES: dict[str, Callable[[pd.Series, int], pd.Series]] = {
    "one seed at a time": keep_seeds, "seeds' mean": keep_means, "seeds' mean, paired": keep_paired}
ONE_AT_A_TIME = ("one seed at a time",)  # a configuration runs to the end with any one of its seeds
EVERYTHING = "all runs to the end"  # no pruning: the reference every strategy is measured against


def prune(curves: pd.DataFrame, schedule: Schedule, keep: Callable[[pd.Series, int], pd.Series]) -> pd.Series:
    """The epochs each run would have run, (config, seed) -> epochs, under `keep` at each milestone."""
    last = int(curves.columns.max())
    ran = pd.Series(last, index=curves.index)
    going = pd.Series(True, index=curves.index)
    for milestone in schedule.milestones(last):
        verdict = keep(curves.loc[going, milestone], schedule.reduction_factor)
        stopped = verdict.index[~verdict]
        ran[stopped] = milestone
        going[stopped] = False
    return ran


# --- what a strategy keeps, against running everything -----------------------------------------------------------

def kept_best(final: pd.Series, ran: pd.Series, last: int) -> str | None:
    """The configuration with the lowest mean final error over its seeds that ran to the end; None if none did."""
    means = seed_means(final[ran == last])
    return means.idxmin() if means.notna().any() else None


def verdict(kept: str | None, best: str, final: pd.Series) -> str:
    """How the kept configuration's mean over all its seeds compares with the true best's seeds."""
    if kept is None:
        return "none ran to the end"
    if kept == best:
        return "the true best"
    mine, theirs = final.xs(kept, level=CONFIG), final.xs(best, level=CONFIG).dropna()
    gap, std = mine.mean() - theirs.mean(), theirs.std(ddof=1)
    import scipy.stats  # here: scipy's import is slow, and only this verdict needs it

    half_width = scipy.stats.t.ppf(0.975, len(theirs) - 1) * std / math.sqrt(len(theirs))
    if gap <= std:
        return "within 1 std of the best"
    return "within the best's 95% t interval" if gap <= half_width else "outside the best's 95% t interval"


def replay_pruning(curves: pd.DataFrame, schedule: Schedule) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """(a row per strategy, running everything first; the epochs each run would have run, per strategy)."""
    last = int(curves.columns.max())
    final = curves[last]
    means = seed_means(final)
    best = means.idxmin()
    everything = len(curves) * last
    ran = {EVERYTHING: pd.Series(last, index=curves.index)}
    ran |= {name: prune(curves, schedule, keep) for name, keep in STRATEGIES.items()}
    rows = []
    for name, epochs in ran.items():
        to_the_end = (epochs == last).groupby(level=CONFIG)
        finished = to_the_end.any() if name in ONE_AT_A_TIME else to_the_end.all()
        kept = kept_best(final, epochs, last)
        seeds = final.xs(kept, level=CONFIG) if kept is not None else pd.Series(dtype=float)
        rows.append(dict(pruning=name, epochs_run=int(epochs.sum()), epochs_saved=everything - int(epochs.sum()),
                         saved_pct=100 * (everything - epochs.sum()) / everything,
                         configs_finished=int(finished.sum()), configs=len(finished), kept_best=kept,
                         kept_mean=seeds.mean(), kept_std=seeds.std(ddof=1), gap_pp=100 * (seeds.mean() - means[best]),
                         verdict=verdict(kept, best, final)))
    return pd.DataFrame(rows), ran


def pruning_markdown(study: str, table: pd.DataFrame, seeds: int) -> str:
    """One study's table from `replay_pruning`."""
    rows = []
    for row in table.to_dict("records"):
        kept = row["kept_best"] is not None
        rows.append([row["pruning"], f"{row['epochs_run']:,}", f"{row['epochs_saved']:,} ({row['saved_pct']:.1f}%)",
                     f"{row['configs_finished']} of {row['configs']}", row["kept_best"] or "—",
                     f"{100 * row['kept_mean']:.2f} ± {100 * row['kept_std']:.2f}" if kept else "—",
                     f"{row['gap_pp']:+.2f}" if kept else "—", row["verdict"]])
    header = ["pruning", "epochs run", "epochs saved", "configurations run to the end", "kept as best",
              f"its final test error, % (mean ± std, {seeds} seeds)", "Δ to the true best, pp", "verdict"]
    return f"Table: {study}.\n\n" + markdown(header, rows, numeric=(1, 2, 5, 6))


def replay_studies(folders: list[Path], schedule: Schedule) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """(the Markdown: a table per study under a caption stating the schedule; every study's rows, with its study
    column; every run's epochs under each strategy)."""
    texts, tables, per_run, lasts = [], [], [], set()
    for folder in folders:
        study = ExportedStudy(folder)
        name = study.info.study
        try:
            curves, run_ids = error_curves(study)
        except NotReplayable as why:
            texts.append(f"{name}: not replayable: {why}\n")
            continue
        lasts.add(int(curves.columns.max()))
        table, ran = replay_pruning(curves, schedule)
        texts.append(pruning_markdown(name, table, curves.index.get_level_values(SEED).nunique()))
        tables.append(table.assign(study=name))
        per_run += [pd.DataFrame({"study": name, "pruning": strategy, "run_id": run_ids[epochs.index].to_numpy(),
                                  CONFIG: epochs.index.get_level_values(CONFIG),
                                  SEED: epochs.index.get_level_values(SEED), "epochs_run": epochs.to_numpy()})
                    for strategy, epochs in ran.items()]
    schedules = "; ".join(schedule.describe(last) for last in sorted(lasts)) or schedule.describe(0)
    caption = (f"Successive halving replayed on each run's test error per epoch ({schedules}): at each milestone "
               f"the units still running go on when their score is at or below the 1/{schedule.reduction_factor} "
               f"quantile of all of theirs (ASHA's cutoff, every unit judged at once). Kept as best: the lowest mean "
               f"final error among the configurations run to the end, shown with its mean over all its seeds as "
               f"shipped; Δ against the lowest such mean of all (running everything).")
    frames = (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(),
              pd.concat(per_run, ignore_index=True) if per_run else pd.DataFrame())
    return caption + "\n\n" + "\n".join(texts), *frames
