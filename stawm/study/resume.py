"""--resume: what a study continued under its name may change, and more seeds for a finished study.

A study resumed with the flags it started with continues its Ray experiment (unfinished and errored trials
from their checkpoints). Two things differ from that plain case:

- **Flags that change what it computes are refused.** Tune restores a study with the search space and
  RunConfig it saved, so a new --epochs, --set or grid on --resume would be silently ignored. The parent
  run's params record every flag of the first launch: any flag outside `MAY_CHANGE` that differs is named
  in one line, and the study does not start.
- **More seeds.** `--seeds 5 --resume` on a study that holds 3 seeds per configuration trains seeds 3 and 4
  of every configuration, and nothing else, in a Ray experiment of their own (`NAME-seeds3-4`: the first
  one's saved search space holds seeds 0..2 and Tune cannot widen it) under the same MLflow parent run.
  The parent's params stay as first launched (MLflow params cannot change); its tags say how many seeds the
  study holds now (`stawm.seeds`) and which were added, in which Ray experiment (`stawm.seeds_added`). The
  same command again continues that extension if it was interrupted.
"""

from __future__ import annotations

from .. import schema
from .flags import StudyArgs

# Flags that say where and how trials run, not what they compute: a resume may change them (a new machine,
# a moved store, another share of the GPU). --seeds may grow, never shrink.
MAY_CHANGE = frozenset({
    "seeds", "name", "tracking_uri", "storage", "data_root", "device", "gpus_per_trial", "cpus_per_trial",
    "max_concurrent", "max_failures", "fuse_seeds", "tracking_outage_budget", "plan", "price_per_hour",
    "optuna_storage", "system_metrics", "no_report", "verbose",
})


class ResumeRefused(ValueError):
    """A --resume that would compute something other than the study it continues; says what differs."""


def changed_flags(recorded: dict[str, str], now: dict, *, may_change=MAY_CHANGE) -> list[str]:
    """'flag: was -> now' for every recorded flag outside `may_change` whose value differs now. Flags the
    first launch did not record (added to the harness since) are not compared: nothing says what they were."""
    changed = []
    for name in sorted(set(recorded) & set(now)):
        if name in may_change or name.startswith("probe_"):  # probe_*: what --gpus-per-trial auto measured
            continue
        if recorded[name] != str(now[name]):
            changed.append(f"{name}: {recorded[name]!r} -> {str(now[name])!r}")
    return changed


def seeds_held(tags: dict[str, str], params: dict[str, str]) -> int:
    """Seeds per configuration the study holds: its tag once seeds were added, else its first launch's param."""
    return int(tags.get(schema.SEEDS_NOW) or params[schema.SEEDS])


def last_extension(tags: dict[str, str]) -> tuple[int, int, str] | None:
    """The most recent seed range added (first, last, Ray experiment), from the parent's tag; None if none."""
    added = [entry for entry in tags.get(schema.SEEDS_ADDED, "").split(",") if entry]
    if not added:
        return None
    seeds, experiment = added[-1].split(":", 1)
    first, last = seeds.split("-")
    return int(first), int(last), experiment


def plan_seeds(args: StudyArgs, name: str, tags: dict[str, str], params: dict[str, str]) -> dict[str, str]:
    """Set this launch's seeds and Ray experiment (`args.first_seed`, `args.tune_name`) for a resumed study;
    returns the parent tags to write (empty unless seeds are added now). Raises ResumeRefused for fewer seeds."""
    held = seeds_held(tags, params)
    if args.seeds < held:
        raise ResumeRefused(f"--seeds {args.seeds}: study {name!r} already holds {held} seeds per configuration; "
                            f"a resume can add seeds, not remove them (give --seeds {held} or more)")
    extension = last_extension(tags)
    if args.seeds == held:  # continue the launch that added the newest seeds, or the study itself
        if extension is not None and extension[1] == held - 1:
            args.first_seed, args.tune_name = extension[0], extension[2]
        return {}
    args.first_seed, args.tune_name = held, f"{name}-seeds{held}-{args.seeds - 1}"
    entry = f"{held}-{args.seeds - 1}:{args.tune_name}"
    earlier = tags.get(schema.SEEDS_ADDED, "")
    return {schema.SEEDS_NOW: str(args.seeds), schema.SEEDS_ADDED: f"{earlier},{entry}" if earlier else entry}
