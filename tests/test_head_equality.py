"""The speed work of issue 13 changed no result: head outputs, losses, gradients and detections of a
fixed tiny model equal those recorded with the code before it (tests/head_reference.py)."""
from __future__ import annotations

import pytest
import torch
from head_reference import REFERENCE_FILE, TASKS, compute


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE_FILE, weights_only=True)


@pytest.mark.parametrize("task", TASKS)
def test_outputs_equal_the_recorded_reference(task, reference):
    torch.set_num_threads(1)  # the reference was recorded single-threaded (same reduction order)
    ref, now = reference[task], compute(task)
    assert sorted(now) == sorted(ref)
    for key in ("cls_logits", "vec_init", "vec_refine"):
        torch.testing.assert_close(now[key], ref[key], rtol=1e-4, atol=1e-5, msg=f"{task} {key}")
    for key in ("loss_cls", "loss_vec_init", "loss_vec_refine", "loss"):
        torch.testing.assert_close(now[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{task} {key}")
    for key in (k for k in ref if k.startswith("grad")):
        scale = ref[f"gradnorm/{key.split('/', 1)[1]}"].item()
        torch.testing.assert_close(now[key], ref[key], rtol=1e-4, atol=1e-5 * scale, msg=f"{task} {key}")
    for key in (k for k in ref if k.startswith("det")):
        if key.endswith("labels"):
            assert torch.equal(now[key], ref[key]), f"{task} {key}"
        else:
            torch.testing.assert_close(now[key], ref[key], rtol=1e-5, atol=1e-3, msg=f"{task} {key}")


def test_the_reference_is_sensitive(reference, monkeypatch):
    """A one-line change of the math (the pyramid mean becoming a sum) must break the comparison."""
    import head_reference

    build = head_reference.build_case

    def build_sum(task):
        model = build(task)
        model.head.pyramid_fuse = "sum"
        return model

    monkeypatch.setattr(head_reference, "build_case", build_sum)
    ref, now = reference["bbox"], compute("bbox")
    assert not torch.allclose(now["cls_logits"], ref["cls_logits"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(now["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
