"""The reference network (lsnet/modeling/reference_head.py, layers.py, fpn.py, postprocess.py and
lsnet/interop/reference.py) against the authors' own outputs (tests/data/reference_head/) and hand
computations."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lsnet.interop.reference import ReferenceKeyError, head_from_config, reference_outputs
from lsnet.modeling.layers import pyramid_deform_conv
from lsnet.modeling.reference_head import pyramid_offsets, pyramid_sources, signed_points, task_branches

ORACLE = Path(__file__).parent / "data" / "reference_head" / "bbox_small_seed0.pt"
SIZES = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]  # P3..P7 of a 256x320 pad


@pytest.fixture(scope="module")
def oracle():
    return torch.load(ORACLE, weights_only=True)


@pytest.fixture(scope="module")
def ours(oracle):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return reference_outputs(oracle)
    finally:
        torch.set_num_threads(threads)


def _close(a, b):
    return (a - b).abs() <= 1e-4 + 1e-4 * b.abs()


def test_oracle_outputs_match(oracle, ours):
    assert set(ours["outputs"]) == set(oracle["outputs"]) == {"cls_scores", "bbox_init", "bbox_refine"}
    margins = oracle["tie_margins"]["init_dcn"]
    for key, levels in oracle["outputs"].items():
        assert len(ours["outputs"][key]) == 5
        for level, (mine, ref) in enumerate(zip(ours["outputs"][key], levels)):
            assert mine.shape == ref.shape, (key, level)
            ok = _close(mine, ref)
            if key != "bbox_init":  # a flipped init pair moves a DCN tap: mask those positions
                ok |= (margins[level] < 1e-3).unsqueeze(1)
            assert ok.all(), f"{key} level {level}: max error {(mine - ref).abs().max().item():.3g}"


def test_oracle_neck_matches(oracle):
    from lsnet.interop.reference import NeckAndHead, convert_state_dict, neck_from_config

    cfg = oracle["config"]
    model = NeckAndHead(neck_from_config(cfg["neck"]), head_from_config(cfg["bbox_head"]))
    model.load_state_dict(convert_state_dict(oracle["state_dict"], model, {"neck.": "fpn.", "bbox_head.": "head."}))
    with torch.no_grad():
        outs = model.fpn([oracle["inputs"][k] for k in ("C3", "C4", "C5")])
    for mine, ref in zip(outs, oracle["neck_outputs"]):
        assert _close(mine, ref).all()


def test_oracle_pre_nms_candidates(oracle):
    from lsnet.interop.reference import decode_config
    from lsnet.modeling.postprocess import decode_candidates

    out = {k: v for k, v in oracle["outputs"].items()}  # decode the reference's own outputs
    layout = task_branches("bbox", 4)
    cfg = decode_config(oracle["config"]["test_cfg"])
    for i, meta in enumerate(oracle["img_metas"]):
        cand = decode_candidates(out, layout, (8, 16, 32, 64, 128), i, meta["img_shape"][:2], cfg)
        ref = oracle["decoded_pre_nms"][i]
        ref_index = oracle["decoded_pre_nms_index"][i]
        assert cand["index"].shape == ref_index.shape
        # pair rows by (level, position); the top-1000 order is the same on the same logits
        assert torch.equal(cand["index"], ref_index)
        assert torch.allclose(cand["bboxes"], ref["bboxes"], atol=1e-2, rtol=0)
        assert torch.allclose(cand["landmarks"], ref["extremes"], atol=1e-2, rtol=0)
        assert torch.allclose(cand["scores"], ref["scores"][:, :-1], atol=1e-5, rtol=0)


def _margin_ok(oracle, image, level, pos):
    m1 = oracle["tie_margins"]["init_dcn"][level][image].reshape(-1)[pos]
    m2 = oracle["tie_margins"]["refine_decode"][level][image].reshape(-1)[pos]
    return bool(m1 >= 1e-3 and m2 >= 1e-3)


def test_oracle_detections_match_as_sets(oracle, ours):
    for i, ref in enumerate(oracle["detections"]):
        mine = ours["detections"][i]
        assert set(mine) == set(ref) == {"bboxes", "extremes", "labels"}
        used = torch.zeros(len(mine["labels"]), dtype=torch.bool)
        must, matched = 0, 0
        for j in range(len(ref["labels"])):
            _, level, pos = oracle["detections_source"][i][j].tolist()
            required = _margin_ok(oracle, i, level, pos)
            must += required
            cand = ((mine["labels"] == ref["labels"][j]) & ~used
                    & ((mine["bboxes"][:, 4] - ref["bboxes"][j, 4]).abs() <= 1e-5)
                    & ((mine["bboxes"][:, :4] - ref["bboxes"][j, :4]).abs().max(dim=1).values <= 1e-2)
                    & ((mine["extremes"] - ref["extremes"][j]).abs().max(dim=1).values <= 1e-2))
            if cand.any():
                used[cand.nonzero()[0, 0]] = True
                matched += required
            else:
                assert not required, f"image {i}: reference detection {j} (level {level}) unmatched"
        assert must >= 97 and matched == must


def test_state_dict_keys_checked(oracle):
    bad = dict(oracle)
    state = dict(oracle["state_dict"])
    state["bbox_head.extra_conv.weight"] = torch.zeros(1)
    del state["bbox_head.cls_convs.1.conv.conv_offset.bias"]
    bad["state_dict"] = state
    with pytest.raises(ReferenceKeyError, match=r"bbox_head\.extra_conv\.weight.*cls_tower\.1\.conv\.conv_offset\.bias"):
        reference_outputs(bad)


def test_kernel_landmarks_per_task():
    bbox = task_branches("bbox", 4)
    assert bbox.branches[0].kernel_landmarks == (0, 1, 2, 3) and bbox.branches[0].num_free_points == 4
    segm = task_branches("segm", 36).branches[0]
    assert segm.kernel_landmarks == (0, 5, 10, 15, 20, 25, 30, 35) and segm.num_free_points == 0
    pose = task_branches("pose_bbox", 17)
    assert [b.name for b in pose.branches] == ["bbox", "pose"] and pose.cls_branch == "pose"
    assert pose.branches[1].kernel_landmarks == (1, 3, 5, 7, 9, 11, 13, 15)
    assert pose.box_branch == "bbox" and pose.landmark_branch == "pose"


def test_signed_points_hand_values():
    v = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, 4.0, 1.0, 7.0]).view(1, 8, 1, 1)  # two points
    # point 0: up 3 > down 1 -> dy = -3; left 2 == right 2 (tie) -> dx = -2; point 1: +4, +7
    assert signed_points(v).flatten().tolist() == [-3.0, -2.0, 4.0, 7.0]


@pytest.mark.parametrize("task,n", [("segm", 36), ("pose_bbox", 17), ("pose_kbox", 17)])
def test_stage1_taps_are_kernel_landmarks_and_centre(task, n):
    """Hand-set init vectors: landmark k's vector is (up, down, left, right) = (k+1, 0, 0, k+1) ->
    signed (dy, dx) = (-(k+1), k+1); the DCN taps must be exactly the kernel landmarks, then the centre."""
    head = head_from_config({"num_classes": 2, "in_channels": 8, "feat_channels": 8, "point_feat_channels": 8,
                             "stacked_convs": 1, "task": task, "num_vectors": n, "conv_module_type": "dcn",
                             "norm_cfg": {"type": "GN", "num_groups": 4}})
    branch = head.branches["segm" if task == "segm" else "pose"]
    torch.nn.init.zeros_(branch.init_out.weight)
    bias = torch.zeros(n + 1, 4)
    k = torch.arange(n + 1, dtype=torch.float32) + 1
    bias[:, 0], bias[:, 1], bias[:, 2], bias[:, 3] = 20 + k, -20.0, -20.0, 20 + k  # softplus ~ identity
    with torch.no_grad():
        branch.init_out.bias.copy_(bias.reshape(-1))
        _, taps = branch.stage1(torch.randn(1, 8, 3, 4))
    expect = [p for p in branch.spec.kernel_landmarks] + [n]
    got = taps[0, :, 0, 0].view(-1, 2)
    assert got.shape == (9, 2)
    assert torch.allclose(got[:, 0], -(torch.tensor(expect, dtype=torch.float32) + 21), atol=1e-4)
    assert torch.allclose(got[:, 1], torch.tensor(expect, dtype=torch.float32) + 21, atol=1e-4)


def test_pyramid_sources_and_compounding_factors():
    assert [pyramid_sources(level, 5) for level in range(5)] == [[0, 1, 2], [1, 0, 2], [2, 1, 3], [3, 2, 4], [4, 3, 2]]
    one = torch.ones(1, 18, 1, 1)
    # the README table of the oracle: the second neighbour's factor compounds in place
    compound = {0: (0.125, 0.125), 1: (1.0, 1.0), 2: (1.0, 1.0), 3: (1.0, 1.2), 4: (8.0, 50 / 9)}
    exact = {0: (0.25, 0.25), 1: (0.5, 0.5), 2: (0.5, 0.5), 3: (0.5, 0.6), 4: (4.0, 10 / 3)}
    for level in range(5):
        c = pyramid_offsets(one, SIZES, level, "compound")
        e = pyramid_offsets(one, SIZES, level, "exact")
        assert c[0][1].flatten()[:2].tolist() == [1.0, 1.0]
        assert c[2][1].flatten()[:2].tolist() == pytest.approx(compound[level])
        assert e[2][1].flatten()[:2].tolist() == pytest.approx(exact[level])
        assert c[1][1].flatten()[:2].tolist() == pytest.approx(e[1][1].flatten()[:2].tolist())


def _naive_pyramid_dcn(src, offset, weight, sh, sw):
    """Loop version of the reference kernel: tap (i, j) of output (h, w) samples
    ((h - 1 + i)·sh + dy, (w - 1 + j)·sw + dx), bilinear, corners outside the map count 0."""
    _, c, hs, ws = src.shape
    _, _, h, w = offset.shape
    cols = torch.zeros(c, 9, h, w, dtype=torch.float64)
    for y0 in range(h):
        for x0 in range(w):
            for t in range(9):
                i, j = divmod(t, 3)
                y = (y0 - 1 + i) * sh + offset[0, 2 * t, y0, x0].item()
                x = (x0 - 1 + j) * sw + offset[0, 2 * t + 1, y0, x0].item()
                if not (-1 < y < hs and -1 < x < ws):
                    continue
                yl, xl = math.floor(y), math.floor(x)
                for yy, xx in ((yl, xl), (yl, xl + 1), (yl + 1, xl), (yl + 1, xl + 1)):
                    if 0 <= yy < hs and 0 <= xx < ws:
                        wt = (1 - abs(y - yy)) * (1 - abs(x - xx))
                        cols[:, t, y0, x0] += wt * src[0, :, yy, xx].double()
    return torch.einsum("oct,cthw->ohw", weight.double().reshape(weight.shape[0], c, 9), cols)


@pytest.mark.parametrize("src_hw,base_hw", [((4, 6), (2, 3)), ((2, 3), (4, 5)), ((1, 2), (2, 3)), ((5, 3), (3, 2))])
def test_pyramid_deform_conv_matches_loop(src_hw, base_hw):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 3, *src_hw, generator=g)
    offset = torch.randn(1, 18, *base_hw, generator=g) * 1.5
    weight = torch.randn(2, 3, 3, 3, generator=g)
    sh, sw = src_hw[0] / base_hw[0], src_hw[1] / base_hw[1]
    got = pyramid_deform_conv(src, offset, weight, sh, sw)[0]
    assert torch.allclose(got.double(), _naive_pyramid_dcn(src, offset, weight, sh, sw), atol=1e-5)


def _reference_keys(task: str, n: int, classes: int, c: int, cin: list[int], convs: int = 3) -> dict[str, tuple]:
    """The state_dict keys and shapes the reference code has for a task (lsnet_head.py:93-258,
    DCNConvModule :1830; mmdet FPN with GN), written out by hand from its attribute names."""
    keys: dict[str, tuple] = {}
    for i, ch in enumerate(cin):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (c, ch, 1, 1)
    for i in range(5):
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (c, cin[-1] if i == 3 else c, 3, 3)
    for prefix in [f"neck.lateral_convs.{i}" for i in range(3)] + [f"neck.fpn_convs.{i}" for i in range(5)]:
        keys[f"{prefix}.gn.weight"] = keys[f"{prefix}.gn.bias"] = (c,)
    branches = {"bbox": ["bbox"], "segm": ["segm"], "pose_bbox": ["bbox", "pose"], "pose_kbox": ["pose"]}[task]
    h = "bbox_head"
    for tower in ["cls"] + branches:
        for i in range(convs):
            keys[f"{h}.{tower}_convs.{i}.conv.weight"] = (c, c, 3, 3)
            keys[f"{h}.{tower}_convs.{i}.conv.bias"] = (c,)
            keys[f"{h}.{tower}_convs.{i}.conv.conv_offset.weight"] = (27, c, 3, 3)
            keys[f"{h}.{tower}_convs.{i}.conv.conv_offset.bias"] = (27,)
            keys[f"{h}.{tower}_convs.{i}.bn.weight"] = keys[f"{h}.{tower}_convs.{i}.bn.bias"] = (c,)
        keys[f"{h}.{tower}_GN.weight"] = keys[f"{h}.{tower}_GN.bias"] = (c,)
        keys[f"{h}.{tower}_af_dcn_conv.0.weight"] = (c, 3 * c, 1, 1)
        keys[f"{h}.{tower}_af_dcn_conv.0.bias"] = (c,)
        keys[f"{h}.{tower}_feat_conv.weight"] = (c, c, 3, 3)
        keys[f"{h}.{tower}_feat_conv.bias"] = (c,)
    keys[f"{h}.pts_cls_conv.weight"] = (c, c, 3, 3)
    keys[f"{h}.pts_cls_out.weight"] = (classes, c, 1, 1)
    keys[f"{h}.pts_cls_out.bias"] = (classes,)
    for b in branches:
        vec = 4 * ((4 if b == "bbox" else n) + 1)
        keys[f"{h}.pts_{b}_init_conv.weight"] = (c, c, 3, 3)
        keys[f"{h}.pts_{b}_init_conv.bias"] = (c,)
        keys[f"{h}.pts_{b}_init_out.weight"] = (vec + (8 if b == "bbox" else 0), c, 1, 1)
        keys[f"{h}.pts_{b}_init_out.bias"] = (vec + (8 if b == "bbox" else 0),)
        keys[f"{h}.pts_{b}_refine_conv.weight"] = (c, c, 3, 3)
        keys[f"{h}.pts_{b}_refine_out.weight"] = (vec, c, 1, 1)
        keys[f"{h}.pts_{b}_refine_out.bias"] = (vec,)
    return keys


@pytest.mark.parametrize("task,n,outputs,landmark_dim", [
    ("segm", 36, {"cls_scores": 3, "segm_init": 148, "segm_refine": 148}, 72),
    ("pose_bbox", 17, {"cls_scores": 3, "bbox_init": 20, "bbox_refine": 20, "pose_init": 72, "pose_refine": 72}, 34),
    ("pose_kbox", 17, {"cls_scores": 3, "pose_init": 72, "pose_refine": 72}, 34),
])
def test_reference_outputs_other_tasks(task, n, outputs, landmark_dim):
    """A segm / pose oracle's shape: every reference key is used, the outputs and detections have the
    reference's layout (the values are checked by the oracles of those tasks)."""
    c, cin = 16, [8, 16, 32]
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in _reference_keys(task, n, 3, c, cin).items()}
    oracle = {
        "config": {"neck": {"type": "FPN", "in_channels": [4] + cin, "out_channels": c, "start_level": 1,
                            "add_extra_convs": "on_input", "num_outs": 5, "norm_cfg": {"type": "GN", "num_groups": 8}},
                   "bbox_head": {"type": "LSHead", "task": task, "num_vectors": n, "num_classes": 3, "in_channels": c,
                                 "feat_channels": c, "point_feat_channels": c, "stacked_convs": 3,
                                 "num_kernel_points": 9, "conv_module_type": "dcn",
                                 "norm_cfg": {"type": "GN", "num_groups": 8}},
                   "test_cfg": {"nms_pre": 50, "score_thr": 0.0, "nms": {"type": "nms", "iou_thr": 0.6},
                                "max_per_img": 20}},
        "state_dict": state,
        "inputs": {f"C{i + 3}": torch.randn(1, ch, 16 // 2 ** i, 24 // 2 ** i, generator=g) for i, ch in enumerate(cin)},
        "img_metas": [{"img_shape": (120, 180, 3)}],
    }
    out = reference_outputs(oracle)
    assert set(out["outputs"]) == set(outputs)
    for key, ch in outputs.items():
        assert [tuple(t.shape) for t in out["outputs"][key]] == [(1, ch, h, w) for h, w in
                                                                  [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]]
    det = out["detections"][0]
    assert det["bboxes"].shape == (20, 5) and det["labels"].shape == (20,)
    lm = [v for k, v in det.items() if k not in ("bboxes", "labels")]
    assert len(lm) == 1 and lm[0].shape == (20, landmark_dim)
    assert (lm[0][:, 0::2] <= 180).all() and (lm[0][:, 1::2] <= 120).all() and (lm[0] >= 0).all()
    state.pop(next(iter(k for k in state if "pts_cls_conv" in k)))
    with pytest.raises(ReferenceKeyError, match="missing.*cls_fusion.sample.weight"):
        reference_outputs(oracle)


def test_sampled_conv_matches_torchvision_dcnv2():
    from torchvision.ops import deform_conv2d

    from lsnet.modeling.layers import ModulatedDeformConv

    g = torch.Generator().manual_seed(3)
    conv = ModulatedDeformConv(4, 5)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, 4, 6, 7, generator=g)
    out = conv.conv_offset(x)
    want = deform_conv2d(x, out[:, :18], conv.weight, conv.bias, padding=1, mask=out[:, 18:].sigmoid())
    assert torch.allclose(conv(x), want, atol=1e-5)


def test_sampled_conv_equals_deform_conv2d_with_taps_outside_and_gradients():
    """The embedding_bag DCNv2 (layers.sampled_conv) == torchvision's deform_conv2d, forward and every
    gradient, on offsets large enough that many taps fall wholly or partly outside the map, and on
    taps sitting exactly on pixel rows / the border (corner weights 0 or 1)."""
    from torchvision.ops import deform_conv2d

    from lsnet.modeling.layers import kernel_grid, sampled_conv

    g = torch.Generator().manual_seed(5)
    b, c, cout, h, w = 2, 6, 5, 5, 7
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, c, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    offset = torch.randn(b, 18, h, w, generator=g, dtype=torch.float64) * 3
    offset[:, :, 0] = torch.randint(-3, 4, (b, 18, w), generator=g).double()  # integer: on pixel rows / borders
    mask = torch.rand(b, 9, h, w, generator=g, dtype=torch.float64)
    positions = kernel_grid(3, h, w, x) + offset
    y, xx = positions[:, 0::2], positions[:, 1::2]
    outside = (y <= -1) | (y >= h) | (xx <= -1) | (xx >= w)
    straddling = ~outside & ((y < 0) | (y > h - 1) | (xx < 0) | (xx > w - 1))
    assert outside.float().mean() > 0.15 and straddling.any()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, offset, mask)]
        out = fn(*leaves)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        return [out.detach()] + [t.grad for t in leaves]

    want = grads(lambda x_, w_, b_, o_, m_: deform_conv2d(x_, o_, w_, b_, padding=1, mask=m_))
    got = grads(lambda x_, w_, b_, o_, m_: sampled_conv(x_, kernel_grid(3, h, w, x_) + o_, w_, b_, m_))
    for name, a, e in zip(["output", "d_input", "d_weight", "d_bias", "d_offset", "d_mask"], got, want):
        assert torch.allclose(a, e, atol=1e-5, rtol=0), (name, (a - e).abs().max())
    # float32 too (the dtype the model runs in)
    x32, off32, m32 = x.float(), offset.float(), mask.float()
    got32 = sampled_conv(x32, kernel_grid(3, h, w, x32) + off32, weight.float(), bias.float(), m32)
    assert torch.allclose(got32, deform_conv2d(x32, off32, weight.float(), bias.float(), padding=1, mask=m32),
                          atol=1e-5)


def _tiny_reference_cfg(**kw):
    from lsnet.modeling import ModelConfig

    base = {"task": "bbox", "num_classes": 3, "backbone": "resnet18", "fpn_channels": 16, "head_channels": 16,
            "head_convs": 1, "norm_groups": 8, "frozen_stages": -1, "norm_eval": False, "head": "reference",
            "fpn_norm": "gn", "fpn_relu_before_p7": False, "fpn_extra_source": "c5"}
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("center_vector", [False, True])
def test_head_outputs_contract(center_vector):
    """The reference layout -> HeadOutputs: pixels (x stride), [top, bottom, left, right] = [up, down,
    left, right], anchors (w·s, h·s), the centre last only with center_vector."""
    from lsnet.modeling import build_model
    from lsnet.modeling.reference_head import head_outputs

    model = build_model(_tiny_reference_cfg(center_vector=center_vector)).eval()
    with torch.no_grad():
        raw = model.head(model.fpn(model.backbone(torch.randn(1, 3, 64, 96))))
        out = head_outputs(raw, model.head.layout, model.head.strides, center_vector)
    n = 5 if center_vector else 4
    assert out.vec_init.shape == (1, 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1, n, 4)
    # level 1 (stride 16, 4x6), position (h=2, w=3) = row 2·6 + 3 of the level
    row = 8 * 12 + 2 * 6 + 3
    assert out.anchors[row].tolist() == [48.0, 32.0]
    ref = raw["bbox_refine"][1][0, :, 2, 3].view(5, 4)[:n] * 16
    assert torch.allclose(out.vec_refine[0, row], ref)
    assert torch.allclose(out.cls_logits[0, row], raw["cls_scores"][1][0, :, 2, 3])


def test_reference_model_trains_and_decodes_pose_box():
    """A pose model with the box branch (pose_bbox): 17 keypoints then the 4 box points in HeadOutputs;
    one training step gives finite losses and gradients reach the free points and the towers."""
    from lsnet.modeling import build_model
    from lsnet.structures import LandmarkTargets

    model = build_model(_tiny_reference_cfg(task="pose", num_classes=1, pose_box="obj"))
    assert list(model.head.branches) == ["bbox", "pose"] and model.head.layout.cls_branch == "pose"
    pts = torch.rand(1, 17, 2) * 40 + 10
    t = LandmarkTargets(torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.tensor([0]), pts,
                        torch.ones(1, 17, dtype=torch.bool), torch.tensor([False]))
    losses = model(torch.randn(1, 3, 64, 64), [t])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.head.branches["pose"].tower[0].conv.weight.grad.abs().sum() > 0
    assert model.head.branches["bbox"].init_out.weight.grad[20:].abs().sum() > 0  # the free points
    model.eval()
    with torch.no_grad():
        dets = model(torch.randn(1, 3, 64, 64))
    assert dets[0].points.shape[1:] == (17, 2)


def _as_reference_checkpoint(model) -> dict:
    """Our detector's weights under the reference's key names (backbone: mmdet ResNet names)."""
    from lsnet.interop.convert import convert_detector_state

    keys = _reference_keys("bbox", 4, 3, 16, [128, 256, 512], convs=1)
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(s, generator=g) for k, s in keys.items()}
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            name = k.replace("backbone.stem.0.", "backbone.conv1.").replace("backbone.stem.1.", "backbone.bn1.")
            state[name] = torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
    convert_detector_state(state, model, "self-check")  # the hand-written names all map
    return {"state_dict": state, "meta": {"epoch": 12}}


def test_convert_reference_checkpoint_cli(tmp_path):
    from lsnet.engine import load_checkpoint
    from lsnet.modeling import build_model
    from pipelines.cli import main

    model = build_model(_tiny_reference_cfg())
    ckpt = _as_reference_checkpoint(model)
    torch.save(ckpt, tmp_path / "ref.pth")
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model: {task: bbox, num_classes: 3, backbone: resnet18, fpn_channels: 16, head_channels: 16,\n"
                   "  head_convs: 1, norm_groups: 8, frozen_stages: -1, norm_eval: false, head: reference,\n"
                   "  fpn_norm: gn, fpn_relu_before_p7: false, fpn_extra_source: c5}\n")
    assert main(["convert", "reference", str(tmp_path / "ref.pth"), "--config", str(cfg),
                 "--out", str(tmp_path / "ours.pt")]) == 0
    ours = load_checkpoint(tmp_path / "ours.pt")["model"]
    sd = ckpt["state_dict"]
    assert torch.equal(ours["backbone.stem.0.weight"], sd["backbone.conv1.weight"])
    assert torch.equal(ours["backbone.layer3.1.conv2.weight"], sd["backbone.layer3.1.conv2.weight"])
    assert torch.equal(ours["fpn.p6.conv.weight"], sd["neck.fpn_convs.3.conv.weight"])
    assert torch.equal(ours["head.branches.bbox.fusion.sample.weight"], sd["bbox_head.pts_bbox_refine_conv.weight"])
    assert torch.equal(ours["head.cls_tower.0.norm.bias"], sd["bbox_head.cls_convs.0.bn.bias"])
    # an unknown and a missing key: exit 2 with one line naming both
    sd = dict(sd)
    sd["bbox_head.loss_scale"] = torch.zeros(1)
    del sd["backbone.layer1.0.bn1.weight"]
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    assert main(["convert", "reference", str(tmp_path / "bad.pth"), "--config", str(cfg),
                 "--out", str(tmp_path / "bad.pt")]) == 2
    assert not (tmp_path / "bad.pt").exists()


def test_convert_error_names_keys(tmp_path, capsys):
    from pipelines.cli import main

    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "neck.extra": torch.zeros(1)}},
               tmp_path / "x.pth")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model: {num_classes: 3, backbone: resnet18, fpn_channels: 16, head_channels: 16, head_convs: 1,"
                   " norm_groups: 8, head: reference, fpn_norm: gn, fpn_extra_source: c5}\n")
    assert main(["convert", "reference", str(tmp_path / "x.pth"), "--config", str(cfg), "--out",
                 str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neck.extra" in err[0] and "missing" in err[0] and "backbone.layer1.0.bn1.weight" in err[0]


def test_backbone_norm_eval_as_mmdet():
    """norm_affine_trains: BatchNorm statistics stay fixed in train mode, its weight and bias train
    (outside the frozen stages); without it, FrozenBatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d

    from lsnet.modeling.backbone import ResNetBackbone

    bb = ResNetBackbone("resnet18", None, frozen_stages=1, norm_eval=True, norm_affine_trains=True).train()
    bn = bb.layer3[0].bn1
    assert isinstance(bn, torch.nn.BatchNorm2d) and not bn.training and bn.weight.requires_grad
    assert not bb.layer1[0].bn1.weight.requires_grad  # frozen stage
    before = bn.running_mean.clone()
    sum(c.sum() for c in bb(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad.abs().sum() > 0
    frozen = ResNetBackbone("resnet18", None, frozen_stages=1, norm_eval=True)
    assert isinstance(frozen.layer3[0].bn1, FrozenBatchNorm2d)


def test_center_vector_is_not_a_detected_landmark():
    """With model.center_vector the centre vectors (after the keypoints and after the box points) are
    left out of decoding: pose detections have 17 keypoints and the box of the box branch."""
    from lsnet.modeling.config import ModelConfig
    from lsnet.modeling.inference import output_vectors

    cfg = ModelConfig(task="pose", num_classes=1, head="reference", center_vector=True, pose_box="obj")
    v = torch.arange(23 * 4, dtype=torch.float32).view(1, 23, 4)  # 17 kps, centre, 4 box, box centre
    kept = output_vectors(v, cfg)[0, :, 0] / 4
    assert kept.tolist() == list(range(17)) + [18, 19, 20, 21]
