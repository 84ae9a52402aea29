"""Guards for the experiment config (issue 24, rows 15 and 16): multi-scale test ranges and the
schedule names that fill ``train.epochs`` / ``train.lr_steps``."""
from __future__ import annotations

from pathlib import Path

import pytest

from lsnet.config import ConfigError
from pipelines.config import SCHEDULES, config_from_dict, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("ranges", ["[[64,64]]", "[[0,0]]", "[[96,64]]", "[[-1,64]]", "[[0,64,128]]"])
def test_empty_or_reversed_scale_range_is_refused(ranges):
    with pytest.raises(ConfigError, match=r"model.test.scale_ranges: need 1 pairs \[min, max\] with 0 <= min < max"):
        load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", ["model.test.scales=[1.0]",
                                                                f"model.test.scale_ranges={ranges}"])


def test_scale_ranges_one_per_scale_and_valid_ones_kept():
    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml",
                      ["model.test.scales=[0.5,2.0]", "model.test.scale_ranges=[[0,64],[32,10000]]"])
    assert cfg.model.test.scale_ranges == [[0.0, 64.0], [32.0, 10000.0]]
    with pytest.raises(ConfigError, match="need 2 pairs"):
        load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml",
                    ["model.test.scales=[0.5,2.0]", "model.test.scale_ranges=[[0,64]]"])


@pytest.mark.parametrize("scales, message", [("[]", "non-empty"), ("[1.0,0]", "> 0"),
                                             ("[1.0,0.5,1.0]", "more than once")])
def test_degenerate_test_scales_are_refused(scales, message):
    """(hole next to row 15) an empty list, a zero factor, a pass listed twice."""
    with pytest.raises(ConfigError, match=message):
        load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", [f"model.test.scales={scales}"])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_name_keeps_explicit_lr_steps(name):
    epochs, steps = SCHEDULES[name]
    cfg = config_from_dict({"schedule": name, "train": {"lr_steps": [5]}})
    assert (cfg.train.epochs, tuple(cfg.train.lr_steps)) == (epochs, (5,))
    # an empty list is explicit too: no decay at all (the tiny configs' choice)
    cfg = config_from_dict({"schedule": name, "train": {"lr_steps": []}})
    assert tuple(cfg.train.lr_steps) == () and cfg.train.epochs == epochs
    # both explicit: the name fills nothing
    cfg = config_from_dict({"schedule": name, "train": {"epochs": 3, "lr_steps": [2]}})
    assert (cfg.train.epochs, tuple(cfg.train.lr_steps)) == (3, (2,))
    # and nothing explicit: the name's
    cfg = config_from_dict({"schedule": name})
    assert (cfg.train.epochs, tuple(cfg.train.lr_steps)) == (epochs, steps)


def test_schedule_named_on_the_command_line_keeps_the_files_lr_steps(tmp_path):
    """The config file sets lr_steps; ``--set schedule=2x`` changes only the epochs it does not set."""
    path = tmp_path / "exp.yaml"
    path.write_text(f"_base_: {REPO_ROOT / 'configs' / 'tiny_bbox.yaml'}\ntrain: {{lr_steps: [3]}}\n")
    cfg = load_config(path, ["schedule=2x"])
    assert tuple(cfg.train.lr_steps) == (3,)
    # tiny.yaml sets its own epochs too
    base = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml")
    assert cfg.train.epochs == base.train.epochs
