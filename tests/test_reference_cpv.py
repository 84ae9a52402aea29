"""CPV on the reference head (issue 18 item 9): ``model.head: reference`` + ``model.cpv`` as the
authors' ``lscpvnet_head.py`` builds it. There is no oracle of the reference's CPV code, so these
check its layout (state_dict keys and shapes, written out by hand from the reference's attributes),
where the corner maps and the foreground embedding enter (module hooks), the foreground targets and
loss by hand values, and one training step."""
from __future__ import annotations

import math

import pytest
import torch
from test_reference_network import _reference_keys, _tiny_reference_cfg

from lsnet.interop.reference import ReferenceKeyError, convert_state_dict, head_from_config
from lsnet.modeling.cpv import foreground_loss, foreground_targets
from lsnet.modeling.reference_head import head_outputs

C, CLASSES, CORNER_DIM = 16, 3, 8


def _cpv_reference_keys(c: int = C, classes: int = CLASSES, corner_dim: int = CORNER_DIM) -> dict[str, tuple]:
    """``LSCPVHead``'s state_dict keys and shapes (``lscpvnet_head.py:98-179``; ``TLPool``/``BRPool``
    in ``ops/corner_pool/corner_pool.py:119-186``), written out by hand: the LSNet bbox head's keys
    with the 6 corner maps widening the pyramid DCNs and the 3x3 feature convs, plus the CPV parts."""
    keys = {k: s for k, s in _reference_keys("bbox", 4, classes, c, [8, 16, 32], convs=1).items()
            if k.startswith("bbox_head.")}
    h = "bbox_head"
    for name in ("pts_cls_conv", "cls_feat_conv", "pts_bbox_refine_conv", "bbox_feat_conv"):
        keys[f"{h}.{name}.weight"] = (c, c + 6, 3, 3)  # feat_channels + 6 (lscpvnet_head.py:136-177)
    keys.update({f"{h}.shared_convs.0.conv.weight": (c, c, 3, 3), f"{h}.shared_convs.0.conv.bias": (c,),
                 f"{h}.shared_convs.0.conv.conv_offset.weight": (27, c, 3, 3),
                 f"{h}.shared_convs.0.conv.conv_offset.bias": (27,),
                 f"{h}.shared_convs.0.bn.weight": (c,), f"{h}.shared_convs.0.bn.bias": (c,),
                 f"{h}.reppoints_sem_out.weight": (classes, c, 1, 1), f"{h}.reppoints_sem_out.bias": (classes,),
                 f"{h}.reppoints_sem_embedding.conv.weight": (c, c, 1, 1),
                 f"{h}.reppoints_sem_embedding.gn.weight": (c,), f"{h}.reppoints_sem_embedding.gn.bias": (c,)})
    for corner in ("tl", "br"):
        p = f"{h}.hem_{corner}"
        for conv in ("p1_conv1", "p2_conv1"):
            keys[f"{p}.{conv}.conv.weight"] = (corner_dim, c, 3, 3)  # first_kernel_size 3
            keys[f"{p}.{conv}.gn.weight"] = keys[f"{p}.{conv}.gn.bias"] = (corner_dim,)
        keys[f"{p}.p_conv1.weight"] = (c, corner_dim, 3, 3)
        keys[f"{p}.conv1.weight"] = (c, c, 1, 1)
        keys[f"{p}.conv2.conv.weight"] = (c, c, 1, 1)  # kernel_size 1
        for gn in ("p_gn1", "gn1", "conv2.gn"):
            keys[f"{p}.{gn}.weight"] = keys[f"{p}.{gn}.bias"] = (c,)
        keys[f"{h}.reppoints_hem_{corner}_score_out.weight"] = (1, c, 3, 3)
        keys[f"{h}.reppoints_hem_{corner}_score_out.bias"] = (1,)
        keys[f"{h}.reppoints_hem_{corner}_offset_out.weight"] = (2, c, 3, 3)
        keys[f"{h}.reppoints_hem_{corner}_offset_out.bias"] = (2,)
    return keys


def _cpv_head_config() -> dict:
    return {"type": "LSCPVHead", "num_classes": CLASSES, "in_channels": C, "feat_channels": C,
            "point_feat_channels": C, "stacked_convs": 1, "shared_stacked_convs": 1, "first_kernel_size": 3,
            "kernel_size": 1, "corner_dim": CORNER_DIM, "norm_cfg": {"type": "GN", "num_groups": 8},
            "conv_module_type": "dcn"}


def _random_state(keys: dict[str, tuple], seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in keys.items()}


def _converted_head():
    head = head_from_config(_cpv_head_config())
    state = _random_state(_cpv_reference_keys())
    converted = convert_state_dict(state, head, {"bbox_head.": ""})
    head.load_state_dict(converted, strict=True)
    return head.eval(), state


def test_cpv_state_dict_maps_every_reference_key():
    """Every LSCPVHead key maps to one of ours with its shape, none of ours is left (the corner maps
    widen exactly the pyramid DCNs and the 3x3 feature convs of both fusions)."""
    head, state = _converted_head()
    ours = head.state_dict()
    assert torch.equal(ours["cls_fusion.sample.weight"], state["bbox_head.pts_cls_conv.weight"])
    assert torch.equal(ours["branches.bbox.fusion.anchor_conv.weight"], state["bbox_head.bbox_feat_conv.weight"])
    assert torch.equal(ours["cpv.pool_br.merge.0.weight"], state["bbox_head.hem_br.p_conv1.weight"])
    assert torch.equal(ours["cpv.pool_tl.skip.1.bias"], state["bbox_head.hem_tl.gn1.bias"])
    assert torch.equal(ours["cpv.foreground_embed.1.weight"], state["bbox_head.reppoints_sem_embedding.gn.weight"])
    assert torch.equal(ours["cpv.shared.0.conv.conv_offset.weight"],
                       state["bbox_head.shared_convs.0.conv.conv_offset.weight"])
    assert torch.equal(ours["cpv.offset_tl.bias"], state["bbox_head.reppoints_hem_tl_offset_out.bias"])
    # a reference key of the LSNet head only (no CPV) or a dropped CPV key: one error naming it
    extra = dict(state, **{"bbox_head.reppoints_sem_out.extra": torch.zeros(1)})
    with pytest.raises(ReferenceKeyError, match="reppoints_sem_out.extra"):
        convert_state_dict(extra, head, {"bbox_head.": ""})
    short = {k: v for k, v in state.items() if "hem_br.conv2" not in k}
    with pytest.raises(ReferenceKeyError, match=r"missing \['cpv.pool_br.out"):
        convert_state_dict(short, head, {"bbox_head.": ""})


def _levels(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, s, s, generator=g) for s in (16, 8, 4, 2, 1)]


def _record(head) -> tuple[dict, list]:
    """Forward hooks: each module's inputs / outputs (cloned) per call."""
    seen: dict[str, list] = {}
    handles = []

    def hook(name):
        def fn(_module, args, output):
            seen.setdefault(name, []).append(([a.clone() for a in args if torch.is_tensor(a)],
                                              output.clone() if torch.is_tensor(output) else output))
        return fn

    for name in ("cls_tower", "branches.bbox.tower", "cpv.shared", "cpv.foreground_embed", "cpv.pool_tl",
                 "cls_fusion.sample", "cls_fusion.anchor_conv", "branches.bbox.fusion.sample",
                 "branches.bbox.fusion.anchor_conv", "branches.bbox.init_conv"):
        handles.append(head.get_submodule(name).register_forward_hook(hook(name)))
    return seen, handles


def test_cpv_corner_maps_enter_before_the_pyramid_dcn_and_feature_conv():
    """Both fusions' pyramid DCN and 3x3 feature conv see C + 6 channels: the tower (+ embedding),
    then the level's 2 heat logits and 4 offsets (lscpvnet_head.py:334-336, 343-386). The DCN of
    level l samples every source level's maps."""
    head, _ = _converted_head()
    seen, handles = _record(head)
    with torch.no_grad():
        out = head(_levels())
    for h in handles:
        h.remove()
    maps = [torch.cat([s, o], dim=1) for s, o in zip(out["hem_score"], out["hem_offset"])]
    for fusion in ("cls_fusion", "branches.bbox.fusion"):
        anchor_inputs = [args[0] for args, _ in seen[f"{fusion}.anchor_conv"]]
        assert len(anchor_inputs) == 5
        for level, x in enumerate(anchor_inputs):
            assert x.shape[1] == C + 6
            torch.testing.assert_close(x[:, C:], maps[level], rtol=0, atol=0)
        sampled = [args[0] for args, _ in seen[f"{fusion}.sample"]]  # 3 sources per level
        assert len(sampled) == 15
        for x in sampled:
            level = [m.shape[-1] for m in maps].index(x.shape[-1])
            assert x.shape[1] == C + 6
            torch.testing.assert_close(x[:, C:], maps[level], rtol=0, atol=0)


def test_cpv_foreground_embedding_is_added_to_cls_reg_and_corner_features():
    """The embedding of the shared conv's output is added to the classifier tower, the box tower
    (stage 1 and the fusions see the sum) and the corner pools' input (lscpvnet_head.py:303-315)."""
    head, _ = _converted_head()
    seen, handles = _record(head)
    with torch.no_grad():
        head(_levels())
    for h in handles:
        h.remove()
    for level in range(5):
        emb = seen["cpv.foreground_embed"][level][1]
        assert emb.abs().sum() > 0
        cls_tower, box_tower = seen["cls_tower"][level][1], seen["branches.bbox.tower"][level][1]
        shared = seen["cpv.shared"][level][1]
        torch.testing.assert_close(seen["cpv.pool_tl"][level][0][0], shared + emb)
        torch.testing.assert_close(seen["branches.bbox.init_conv"][level][0][0], box_tower + emb)
        torch.testing.assert_close(seen["cls_fusion.anchor_conv"][level][0][0][:, :C], cls_tower + emb)
        torch.testing.assert_close(seen["branches.bbox.fusion.anchor_conv"][level][0][0][:, :C], box_tower + emb)


def test_cpv_head_outputs_shapes():
    head, _ = _converted_head()
    feats = _levels()
    with torch.no_grad():
        out = head(feats)
    assert set(out) == {"cls_scores", "bbox_init", "bbox_refine", "hem_score", "hem_offset", "sem_score"}
    for level, f in enumerate(feats):
        hw = f.shape[-2:]
        assert out["hem_score"][level].shape == (2, 2, *hw) and out["hem_offset"][level].shape == (2, 4, *hw)
        assert out["sem_score"][level].shape == (2, CLASSES, *hw) and out["bbox_refine"][level].shape == (2, 20, *hw)
    ho = head_outputs(out, head.layout, head.strides, center_vector=True)
    p = sum(f.shape[-1] * f.shape[-2] for f in feats)
    assert ho.corner_logits.shape == (2, p, 2) and ho.corner_offsets.shape == (2, p, 4)
    torch.testing.assert_close(ho.corner_offsets[:, 16 * 16 + 3], out["hem_offset"][1][:, :, 0, 3])
    assert ho.foreground_logits is out["sem_score"]


def test_cpv_is_bbox_only_on_the_reference_head():
    from lsnet.modeling.reference_head import ReferenceHead, task_branches

    with pytest.raises(ValueError, match="bbox task only"):
        ReferenceHead(task_branches("segm", 36), 3, 16, 16, 1, 8, cpv=True)


def test_foreground_targets_hand_values():
    """Cells floor(y1/8)..floor(y2/8) x floor(x1/8)..floor(x2/8) of a box are 1 in its class, weight
    1/area; where two boxes of a class overlap, the smaller one's weight."""
    boxes = torch.tensor([[8.0, 0.0, 24.0, 15.0], [0.0, 0.0, 31.0, 31.0], [10.0, 9.0, 12.0, 17.0]])
    target, weight = foreground_targets((4, 4), boxes, torch.tensor([1, 0, 1]), 2)
    t1 = torch.zeros(4, 4)
    t1[0:2, 1:4] = 1
    t1[1:3, 1] = 1
    assert torch.equal(target[1], t1) and torch.equal(target[0], torch.ones(4, 4))
    assert weight[1, 0, 2] == pytest.approx(1 / 240) and weight[1, 1, 1] == pytest.approx(1 / 16)
    assert weight[1, 2, 1] == pytest.approx(1 / 16) and weight[1, 3, 3] == 0
    assert weight[0, 3, 3] == pytest.approx(1 / 961)


def test_foreground_loss_hand_value():
    """SEPFocalLoss over two levels (the second resized nearest from the stride-8 map): positives
    ``α (1-p)^γ (-log p) w / Σw``, the rest ``(1-α) p^γ (-log(1-p)) / #positives``."""
    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 0, 0] = 1
    weight = torch.zeros(1, 1, 2, 2)
    weight[0, 0, 0, 0] = 0.5
    logits = [torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)]  # p = 0.5 everywhere
    a, term = 0.25, 0.25 * math.log(2)  # (1-p)^2 (-log p) = p^2 (-log(1-p))
    expected = (2 * a * term * 0.5) / (2 * 0.5) + (3 * (1 - a) * term) / 2
    assert float(foreground_loss(logits, target, weight)) == pytest.approx(expected, rel=1e-5)
    # no objects: the negatives over max(#positives, 1) (the reference would divide by zero)
    empty = foreground_loss(logits, torch.zeros_like(target), torch.zeros_like(weight))
    assert float(empty) == pytest.approx(5 * (1 - a) * term, rel=1e-5)


def test_reference_cpv_model_trains():
    """One step of the detector with the reference head and CPV: the corner and foreground losses are
    part of ``loss`` with the reference config's weights, and gradients reach the CPV parts."""
    from lsnet.modeling import build_model
    from lsnet.structures import LandmarkTargets

    torch.manual_seed(0)
    from lsnet.modeling.config import LossConfig

    cfg = _tiny_reference_cfg(cpv=True, center_vector=True, loss=LossConfig(vector_loss_form="reference"))
    model = build_model(cfg)
    boxes = torch.tensor([[10.0, 12.0, 50.0, 40.0], [30.0, 5.0, 60.0, 60.0]])
    pts = torch.stack([torch.stack([(b[0] + b[2]) / 2, b[1]]) for b in boxes])
    points = torch.stack([torch.stack([pts[i], torch.stack([b[0], (b[1] + b[3]) / 2]),
                                       torch.stack([(b[0] + b[2]) / 2, b[3]]), torch.stack([b[2], (b[1] + b[3]) / 2])])
                          for i, b in enumerate(boxes)])
    t = LandmarkTargets(boxes, torch.tensor([0, 2]), points, torch.ones(2, 4, dtype=torch.bool),
                        torch.zeros(2, dtype=torch.bool))
    losses = model(torch.randn(1, 3, 64, 64), [t])
    for key in ("loss_heatmap", "loss_offset", "loss_foreground"):
        assert torch.isfinite(losses[key]) and losses[key] > 0, key
    lc = cfg.loss
    total = (losses["loss_cls"] + lc.beta * losses["loss_vec_init"] + lc.gamma * losses["loss_vec_refine"]
             + 0.25 * losses["loss_heatmap"] + 1.0 * losses["loss_offset"] + 0.1 * losses["loss_foreground"])
    torch.testing.assert_close(losses["loss"], total)
    losses["loss"].backward()
    cpv = model.head.cpv
    for name, p in (("foreground_out", cpv.foreground_out.weight), ("foreground_embed", cpv.foreground_embed[0].weight),
                    ("shared", cpv.shared[0].conv.weight), ("heat_tl", cpv.heat_tl.weight),
                    ("offset_br", cpv.offset_br.weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        dets = model(torch.randn(1, 3, 64, 64))
    assert dets[0].boxes.shape[1] == 4


def test_convert_reference_cpv_detector_checkpoint():
    """A whole LSNet-CPV detector checkpoint in the reference's names (backbone, neck, LSCPVHead)
    converts into our model with CPV (``lsnet convert reference``'s mapping): every key used."""
    from lsnet.interop.convert import convert_detector_state
    from lsnet.modeling import build_model

    model = build_model(_tiny_reference_cfg(cpv=True, center_vector=True))
    keys = {k: s for k, s in _reference_keys("bbox", 4, 3, 16, [128, 256, 512], convs=1).items() if k.startswith("neck.")}
    keys.update(_cpv_reference_keys(c=16, classes=3, corner_dim=64))
    state = _random_state(keys, seed=9)
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            name = k.replace("backbone.stem.0.", "backbone.conv1.").replace("backbone.stem.1.", "backbone.bn1.")
            state[name] = v.clone()
    ours = convert_detector_state(state, model, "cpv checkpoint")
    model.load_state_dict(ours, strict=True)
    assert torch.equal(model.head.cpv.foreground_out.bias, state["bbox_head.reppoints_sem_out.bias"])
    assert torch.equal(model.head.cls_fusion.anchor_conv.weight, state["bbox_head.cls_feat_conv.weight"])
