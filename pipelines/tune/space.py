"""Search-space files (``configs/spaces/*.yaml``) for ``lsnet tune``, validated before any trial starts.

A space file maps dotted keys of the experiment config (pipelines.config) to a domain::

    space:
      model.num_points: {grid: [18, 36, 72]}       # every value, crossed with the other grid keys
      model.loss.alpha: {choice: [0.0, 0.1, 0.2]}  # one value drawn per sample
      model.loss.gamma: {uniform: [1.0, 3.0]}      # also loguniform: [lo, hi], randint: [lo, hi)
    # optional defaults for the command's flags:
    metric: segm_AP
    mode: max
    num_samples: 1
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}

Every key is checked with the config validation itself (:func:`pipelines.config.config_from_dict`) on
each value a domain can produce (a grid/choice list, the bounds of a range): an unknown key or a value
of the wrong type is one :class:`lsnet.config.ConfigError` naming the file and the key. A segm
``model.num_points`` that the shards do not hold (``lsnet preprocess --contour-points``) fails the same
way, naming the counts the shards have.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lsnet.config import ConfigError, from_dict, read_yaml_mapping, to_dict
from pipelines.config import ExperimentConfig, config_from_dict

#: domain kind -> what its value must be
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class SchedulerSpec:
    """Early stopping: ``asha`` (async successive halving on ``epoch``) or ``fifo`` (none)."""

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0  # 1/reduction_factor of the trials go on at each rung


@dataclass
class SpaceFileOptions:
    """The optional keys of a space file besides ``space`` (flags of ``lsnet tune`` override them)."""

    metric: str | None = None  # None: the task's AP (bbox_AP / segm_AP / kp_AP)
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)


@dataclass
class SearchSpace:
    """Dotted config key -> ``(kind, values)``; ``source`` names the file for error messages."""

    params: dict[str, tuple[str, list[Any]]]
    options: SpaceFileOptions = field(default_factory=SpaceFileOptions)
    source: str = "<space>"

    def candidate_values(self, key: str) -> list[Any]:
        """The values of ``key`` that validation checks: every listed value, or a range's bounds."""
        kind, values = self.params[key]
        if kind == "randint":  # [lo, hi): hi itself is never drawn
            return [values[0], values[1] - 1]
        if kind in ("uniform", "loguniform"):  # Tune draws floats
            return [float(v) for v in values]
        return list(values)

    def to_tune(self) -> dict[str, Any]:
        """The Tune param space of the searched keys (``{key: tune domain}``)."""
        from ray import tune

        make = {"grid": tune.grid_search, "choice": tune.choice,
                "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                "randint": lambda v: tune.randint(*v)}
        return {key: make[kind](list(values)) for key, (kind, values) in self.params.items()}

    def describe(self) -> dict[str, str]:
        """``{key: "grid [18, 36, 72]"}`` (parent-run params)."""
        return {key: f"{kind} {values}" for key, (kind, values) in self.params.items()}


def _parse_domain(source: str, key: str, spec: Any) -> tuple[str, list[Any]]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"{source}: {key}: expected one of {{{', '.join(d + ': ...' for d in DOMAINS)}}}, "
                          f"got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: {key}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        seen = []
        for v in values:
            if v in seen:  # (18 == 18.0 too) the same trial twice
                raise ConfigError(f"{source}: {key}: {kind} lists {v!r} more than once (a repeated value "
                                  "trains the same trial again)")
            seen.append(v)
    if kind in ("uniform", "loguniform", "randint"):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or not values[0] < values[1]:
            raise ConfigError(f"{source}: {key}: {kind} needs [lo, hi] with lo < hi, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{source}: {key}: loguniform needs lo > 0, got {values!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{source}: {key}: randint needs integer bounds, got {values!r}")
    return kind, values


def load_space(path: str | Path) -> SearchSpace:
    """Read and parse a space file (domains only; :func:`validate_space` checks them against a config)."""
    path = Path(path)
    data = read_yaml_mapping(path, ConfigError, "space file")
    if not isinstance(data.get("space"), dict) or not data["space"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'space:' section of dotted config keys")
    data = dict(data)
    raw = data.pop("space")
    try:
        options = from_dict(SpaceFileOptions, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    params = {str(key): _parse_domain(str(path), str(key), spec) for key, spec in raw.items()}
    return SearchSpace(params, options, source=str(path))


def trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> ExperimentConfig:
    """The config of one trial: ``base`` (a plain config dict) with dotted ``overrides`` applied."""
    data = copy.deepcopy(base)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a config section")
        node[parts[-1]] = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
    return config_from_dict(data)


def shard_contour_points(shard_dir: str) -> list[int]:
    """The contour-landmark counts a shard directory holds (from its manifest)."""
    from lsnet.data.shards import ShardError, load_manifest

    try:
        return list(load_manifest(shard_dir)["config"]["target"]["contour_points"])
    except (ShardError, OSError, KeyError) as err:
        raise ConfigError(f"data shards {shard_dir}: cannot read the contour counts ({err}); "
                          "run `lsnet preprocess` first") from None


def validate_variants(base: ExperimentConfig, variants: list[dict[str, Any]], source: str) -> None:
    """Every variant (dotted key -> value) builds a valid config; segm point counts exist in the shards.
    Raises ConfigError ``SOURCE: KEY: problem``."""
    base_dict = to_dict(base)
    held: dict[str, list[int]] = {}
    for overrides in variants:
        for key, value in overrides.items():
            try:
                cfg = trial_config(base_dict, {key: value})
            except ConfigError as err:
                text = str(err)
                raise ConfigError(f"{source}: {key}: {text.removeprefix(key + ': ')}") from None
            if key == "model.num_points" and cfg.model.task == "segm":
                for shards in filter(None, (cfg.data.train_shards, cfg.data.val_shards)):
                    have = held.setdefault(shards, shard_contour_points(shards))
                    if value not in have:
                        raise ConfigError(f"{source}: model.num_points: {value} is not in the shards "
                                          f"({shards} holds contours of {have} points; "
                                          "lsnet preprocess --contour-points)")
        try:  # the whole variant together (e.g. two keys that must agree)
            trial_config(base_dict, overrides)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def validate_space(base: ExperimentConfig, space: SearchSpace) -> None:
    """Check every searched key on each value its domain can produce (see module docstring)."""
    variants = [{key: value} for key in space.params for value in space.candidate_values(key)]
    validate_variants(base, variants, space.source)
