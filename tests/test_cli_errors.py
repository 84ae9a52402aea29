"""User errors end in one line ``lsnet CMD: error: ...`` and exit status 2 (pipelines.cli); ``--debug`` /
``LSNET_DEBUG=1`` show the traceback instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsnet.config import ConfigError
from lsnet.data.shards import ShardError
from lsnet.errors import InputError, LsnetError
from lsnet.modeling.backbone import PretrainedWeightsError
from pipelines.cli import main
from pipelines.preprocess import PreprocessError

REPO_ROOT = Path(__file__).resolve().parent.parent
GT = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
      "categories": [{"id": 1, "name": "a"}]}


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lsnet {command}: error: ")
    return lines[0]


def test_project_errors_share_one_base_class_and_keep_their_old_bases():
    for cls, old in ((ConfigError, ValueError), (ShardError, RuntimeError), (PreprocessError, ValueError),
                     (PretrainedWeightsError, RuntimeError), (InputError, ValueError)):
        assert issubclass(cls, LsnetError) and issubclass(cls, old)


def _files(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(GT))
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]))
    return gt, res


@pytest.mark.parametrize("case", ["missing", "truncated", "wrong_shape", "unknown_image", "out_is_file",
                                  "out_under_file"])
def test_evaluate_user_errors_are_one_line_exit_2(tmp_path, capsys, case):
    gt, res = _files(tmp_path)
    args = ["evaluate", "--gt", str(gt), "--results", str(res)]
    expected = {"missing": "nothere.json does not exist", "truncated": "is not valid JSON (truncated?)",
                "wrong_shape": "is not a COCO mapping (top level is a list)",
                "unknown_image": "1 result image ids are not in the ground truth, e.g. [77]",
                "out_is_file": "gt.json: Is a directory", "out_under_file": "gt.json: exists and is not a directory"}
    if case == "missing":
        args[2] = str(tmp_path / "nothere.json")
    elif case == "truncated":
        gt.write_text(json.dumps(GT)[:40])
    elif case == "wrong_shape":
        gt.write_text("[1, 2]")
    elif case == "unknown_image":
        res.write_text(json.dumps([{"image_id": 77, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]))
    elif case == "out_is_file":
        args += ["--out", str(tmp_path)]  # a directory where the JSON file should go
        expected["out_is_file"] = f"{tmp_path}: Is a directory"
    else:
        args += ["--out", str(gt / "metrics.json")]  # the folder would have to be a file
    assert main(args) == 2
    line = _one_error_line(capsys, "evaluate")
    assert expected[case] in line


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    _, res = _files(tmp_path)
    args = ["evaluate", "--gt", str(tmp_path / "nothere.json"), "--results", str(res)]
    with pytest.raises(InputError, match="nothere.json"):
        main([*args, "--debug"])
    with pytest.raises(InputError, match="nothere.json"):
        main(["--debug", *args])
    monkeypatch.setenv("LSNET_DEBUG", "1")
    with pytest.raises(InputError, match="nothere.json"):
        main(args)
    monkeypatch.setenv("LSNET_DEBUG", "0")
    assert main(args) == 2


def test_predict_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "img.jpg"), "--checkpoint", str(tmp_path / "ck.pt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "ck.pt" in _one_error_line(capsys, "predict")


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The real process: no traceback on stderr, exit status 2."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("LSNET_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--gt", str(tmp_path / "no.json"),
                           "--results", str(tmp_path / "no.json")], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lsnet evaluate: error: results file {tmp_path / 'no.json'} does not exist"
