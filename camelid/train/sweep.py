"""`camelid sweep`: find hyperparameters on a small proxy model with short trainings, then carry them up.

Optuna's TPE sampler proposes values from a search space (YAML); each trial is a real `camelid pretrain`
run of `steps` steps whose validation losses are reported as it goes, so the median pruner stops trials
that fall behind. The study lives in a SQLite file in the sweep folder: run the command again to add trials.
Results: best.yaml (the recipe with the best values), trials.csv and sweep.png."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import yaml

from camelid.errors import CamelidError, require
from camelid.files import atomic_file, claim_folder, write_text
from camelid.train.config import TrainConfig, apply_overrides, load_train_config
from camelid.train.trainer import train

DEFAULT_SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "warmup_steps": {"type": "int", "low": 0, "high": 50},
    "micro_batch": {"type": "categorical", "choices": [4, 8, 16]},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.2},
}
KINDS = ("float", "int", "categorical")


def read_space(path: str | Path | None) -> dict:
    """The search space: {key: {type: float|int|categorical, low, high, log} or {choices: [...]}}."""
    if path is None:
        return DEFAULT_SPACE
    try:
        space = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CamelidError(f"{path}: cannot read the search space ({exc.__class__.__name__})") from None
    if not isinstance(space, dict) or not space:
        raise CamelidError(f"{path}: the search space must map config keys to ranges")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, spec in space.items():
        if key not in fields and not key.startswith("model."):
            raise CamelidError(f"{path}: unknown key {key!r}")
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            raise CamelidError(f"{path}: {key}: give type float, int or categorical")
        needed = ("choices",) if spec["type"] == "categorical" else ("low", "high")
        if any(n not in spec for n in needed):
            raise CamelidError(f"{path}: {key}: a {spec['type']} range needs {' and '.join(needed)}")
    return space


def suggest(trial, space: dict) -> dict[str, object]:
    values = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return values


def sweep(config: str | None, overrides: list[str], out: str | Path, trials: int, steps: int,
          space_path: str | None = None) -> dict:
    require("optuna", extra="sweep")
    import optuna

    space = read_space(space_path)
    base = load_train_config(config, overrides + [f"max_steps={steps}"])
    if not base.val_data:
        raise CamelidError("val_data: a sweep ranks trials by validation loss, so it needs validation shards")
    out = Path(out)
    claim_folder(out)  # a sweep folder is resumed (study.db); a user's folder is refused
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="camelid", storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=base.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    eval_every = max(1, steps // 5)

    def objective(trial):
        values = suggest(trial, space)
        cfg = load_train_config(config, overrides + [f"max_steps={steps}", f"eval_every={eval_every}",
                                                     f"ckpt_every={steps}", "keep_last=1",
                                                     f"out_dir={out / f'trial_{trial.number:03d}'}"]
                                + [f"{k}={v}" for k, v in values.items()])

        def report(step: int, val_loss: float):
            if not math.isfinite(val_loss):
                raise optuna.TrialPruned()
            trial.report(val_loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        last = {}
        train(cfg, on_eval=lambda step, loss: (last.update(loss=loss), report(step, loss)))
        return last["loss"]

    study.optimize(objective, n_trials=trials, catch=())
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise CamelidError("no trial completed: widen the search space or train longer (--steps)")
    best = study.best_trial
    write_best(config, overrides, best.params, out / "best.yaml")
    write_trials(study, out / "trials.csv")
    plot_sweep(study, space, out / "sweep.png")
    return {"best_val_loss": best.value, "best_params": best.params, "trials": len(study.trials),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)}


def write_best(config: str | None, overrides: list[str], params: dict, path: Path):
    """The recipe as it was, with the best values filled in: ready for a full-length run."""
    data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if config else {}
    apply_overrides(data, overrides + [f"{k}={v}" for k, v in params.items()])
    write_text(path, "# written by camelid sweep: the best trial's values\n" + yaml.safe_dump(data, sort_keys=False))


def write_trials(study, path: Path):
    keys = sorted({k for t in study.trials for k in t.params})
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", "val_loss", *keys])
        for t in study.trials:
            w.writerow([t.number, t.state.name.lower(), t.value, *(t.params.get(k) for k in keys)])


def plot_sweep(study, space: dict, png: Path):
    """Validation loss against each parameter (pruned trials at their last report, in grey) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    trials = [t for t in study.trials if t.params and (t.value is not None or t.intermediate_values)]
    loss = [t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)] for t in trials]
    done = [t.state == optuna.trial.TrialState.COMPLETE for t in trials]
    keys = list(space)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.2 * (len(keys) + 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for ok, colour, label in ((True, "tab:blue", "complete"), (False, "lightgrey", "pruned")):
            pts = [(t.params[key], v) for t, v, d in zip(trials, loss, done) if d == ok and key in t.params]
            if pts:
                ax.scatter(*zip(*pts), c=colour, s=18, label=label)
        if space[key].get("log"):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("validation loss")
    ax = axes[0][-1]
    best, running = [], math.inf
    for v, d in zip(loss, done):
        running = min(running, v) if d else running
        best.append(running)
    ax.plot([t.number for t in trials], best, "-o", ms=3)
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
