"""The LSNet network: output shapes, losses on empty images, ablation switches, frozen stages, DCN
gradients, pretrained-weight errors, post-processing and test-time augmentation (issue 3)."""
from __future__ import annotations

import copy
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d, deform_conv2d

from lsnet.config import ConfigError, from_dict
from lsnet.modeling import HeadOutputs, ModelConfig, build_model
from lsnet.modeling.backbone import DeformableConv, PretrainedWeightsError, ResNetBackbone
from lsnet.modeling.config import LossConfig
from lsnet.modeling.head import default_dcn_point_indices, kernel_points, sample_features
from lsnet.modeling.inference import postprocess, predict_with_tta
from lsnet.structures import LandmarkTargets

NUM_CLASSES = 3


def tiny_cfg(task="bbox", **kw) -> ModelConfig:
    kw.setdefault("fpn_channels", 32)
    kw.setdefault("head_channels", 32)
    kw.setdefault("head_convs", 1)
    kw.setdefault("norm_groups", 8)
    return ModelConfig(task=task, num_classes=NUM_CLASSES, backbone="resnet18", **kw)


def make_targets(task: str, num_points: int, boxes: list[list[float]], labels: list[int]) -> LandmarkTargets:
    """Objects whose landmarks lie on the box border (extreme points for bbox)."""
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    m = b.shape[0]
    x1, y1, x2, y2 = b.unbind(1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if task == "bbox":
        pts = torch.stack([torch.stack([cx, y1], 1), torch.stack([x1, cy], 1),
                           torch.stack([cx, y2], 1), torch.stack([x2, cy], 1)], dim=1)
    else:
        t = torch.linspace(0, 2 * torch.pi, num_points + 1)[:-1]
        pts = torch.stack([cx[:, None] + (x2 - x1)[:, None] / 2 * torch.sin(t),
                           cy[:, None] - (y2 - y1)[:, None] / 2 * torch.cos(t)], dim=-1)
    visible = torch.ones(m, num_points, dtype=torch.bool)
    if task == "pose" and m:
        visible[:, 3:5] = False  # unlabelled ears
    return LandmarkTargets(b, torch.tensor(labels, dtype=torch.int64), pts, visible, torch.zeros(m, dtype=torch.bool))


def two_image_batch(seed: int = 0):
    """Images of 96x128 and 128x80 (h, w) padded into one 128x128 batch."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(2, 3, 128, 128)
    images[0, :, :96, :128] = torch.randn(3, 96, 128, generator=g)
    images[1, :, :128, :80] = torch.randn(3, 128, 80, generator=g)
    return images, [(96, 128), (128, 80)]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def test_config_defaults_and_errors():
    assert ModelConfig(task="segm").num_points == 36
    assert ModelConfig(task="pose").num_points == 17
    cfg = from_dict(ModelConfig, {"task": "pose", "test": {"nms_iou": 0.5}, "loss": {"gamma": 1.0}})
    assert cfg.test.nms_iou == 0.5 and cfg.loss.gamma == 1.0 and cfg.test.max_dets == 100
    with pytest.raises(ConfigError, match="feature_mode"):
        from_dict(ModelConfig, {"feature_mode": "PX"})
    with pytest.raises(ConfigError, match="head_chanels"):
        from_dict(ModelConfig, {"head_chanels": 3})
    with pytest.raises(ValueError, match="num_points"):
        ModelConfig(task="bbox", num_points=36)
    with pytest.raises(ValueError, match="dcn_stages"):
        ModelConfig(dcn_stages=[2])


# ---------------------------------------------------------------------------------------------
# shapes of every output, all three tasks, two images of different sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["bbox", "segm", "pose"])
def test_output_shapes_and_detections(task):
    cfg = tiny_cfg(task)
    cfg.test.score_thr = 0.0  # an untrained model scores ~0.01: keep everything
    cfg.test.max_dets = 30
    model = build_model(cfg).eval()
    images, sizes = two_image_batch()
    n = cfg.num_points
    with torch.no_grad():
        out = model.forward_raw(images)
        dets = model(images, image_sizes=sizes)
    # 128 px: P3..P7 are 16, 8, 4, 2, 1 cells wide
    assert out.num_points_per_level == [256, 64, 16, 4, 1]
    p = sum(out.num_points_per_level)
    assert out.cls_logits.shape == (2, p, NUM_CLASSES) and out.cls_logits.dtype == torch.float32
    assert out.vec_init.shape == (2, p, n, 4) and out.vec_refine.shape == (2, p, n, 4)
    assert (out.vec_init > 0).all() and (out.vec_refine > 0).all()
    assert out.anchors.shape == (p, 2)
    assert torch.allclose(out.anchors[:2], torch.tensor([[4.0, 4.0], [12.0, 4.0]]))

    assert len(dets) == 2
    for d, (h, w) in zip(dets, sizes):
        k = len(d)
        assert 0 < k <= 30
        assert d.boxes.shape == (k, 4) and d.boxes.dtype == torch.float32
        assert d.scores.shape == (k,) and (d.scores[:-1] >= d.scores[1:]).all()
        assert d.labels.shape == (k,) and d.labels.dtype == torch.int64
        assert ((d.labels >= 0) & (d.labels < NUM_CLASSES)).all()
        assert d.points.shape == (k, n, 2)
        assert (d.points[..., 0] >= 0).all() and (d.points[..., 0] <= w).all()
        assert (d.points[..., 1] >= 0).all() and (d.points[..., 1] <= h).all()
        assert torch.equal(d.boxes[:, :2], d.points.amin(1)) and torch.equal(d.boxes[:, 2:], d.points.amax(1))
        if task == "pose":
            assert d.point_scores.shape == (k, n)
            assert torch.equal(d.point_scores, d.scores[:, None].expand(k, n))
        else:
            assert d.point_scores is None


@pytest.mark.parametrize("task", ["bbox", "segm", "pose"])
def test_training_step_losses(task):
    cfg = tiny_cfg(task)
    model = build_model(cfg).train()
    images, _ = two_image_batch()
    n = cfg.num_points
    targets = [make_targets(task, n, [[10, 12, 70, 80], [60, 20, 120, 60]], [0, 2]),
               make_targets(task, n, [[5, 30, 75, 120]], [1])]
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_vec_init", "loss_vec_refine", "loss", "pos_iou"}
    assert 0 <= losses.pop("pos_iou") <= 1
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    # cross-IOU losses lie in [0, 1]; the total is L_cls + 1·L_vec1 + 2·L_vec2
    assert 0 < losses["loss_vec_init"] < 1 and 0 < losses["loss_vec_refine"] < 1
    expected = losses["loss_cls"] + losses["loss_vec_init"] + 2 * losses["loss_vec_refine"]
    assert torch.allclose(losses["loss"], expected)
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("task", ["bbox", "pose"])
def test_empty_images_train_without_nan(task):
    cfg = tiny_cfg(task)
    model = build_model(cfg).train()
    images, _ = two_image_batch()
    targets = [LandmarkTargets.empty(cfg.num_points), LandmarkTargets.empty(cfg.num_points)]
    losses = model(images, targets)
    assert losses["loss_vec_init"] == 0 and losses["loss_vec_refine"] == 0
    assert torch.isfinite(losses["loss"]) and losses["loss_cls"] > 0
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name  # every parameter stays in the graph (DDP needs that)
            assert torch.isfinite(p.grad).all(), name


def test_crowd_only_image_ignores_its_region():
    cfg = tiny_cfg("bbox")
    model = build_model(cfg).train()
    images, _ = two_image_batch()
    crowd = make_targets("bbox", 4, [[0, 0, 128, 128]], [0])
    crowd.iscrowd[:] = True
    empty = LandmarkTargets.empty(4)
    # a crowd box covering the whole image ignores every point of image 0: only image 1's negatives count
    with torch.no_grad():
        out = model.forward_raw(images)
    from lsnet.modeling import compute_losses
    both = compute_losses(out, [crowd, empty], cfg)
    only_second = compute_losses(HeadOutputs(out.cls_logits[1:], out.vec_init[1:], out.vec_refine[1:], out.anchors,
                                             out.num_points_per_level, out.strides), [empty], cfg)
    assert torch.allclose(both["loss_cls"], only_second["loss_cls"])


# ---------------------------------------------------------------------------------------------
# the landmark DCN and the ablation switches
# ---------------------------------------------------------------------------------------------
def test_sample_features_matches_torchvision_deform_conv():
    """Landmark sampling + kernel == torchvision's deform_conv2d with offset = position/stride − grid."""
    torch.manual_seed(1)
    b, c, h, w, stride, cout = 2, 5, 6, 7, 8, 4
    feature = torch.randn(b, c, h, w)
    weight = torch.randn(cout, c, 3, 3)
    offset = torch.randn(b, 18, h, w) * 2.0  # (dy, dx) per kernel point, row-major kernel order
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([torch.tensor([i, j]) for i in (-1, 0, 1) for j in (-1, 0, 1)])  # (9, 2) (di, dj)
    off = offset.reshape(b, 9, 2, h, w)
    pos_y = (ys + grid[:, 0, None, None] + off[:, :, 0] + 0.5) * stride  # cell centres in pixels
    pos_x = (xs + grid[:, 1, None, None] + off[:, :, 1] + 0.5) * stride
    positions = torch.stack([pos_x, pos_y], dim=-1).permute(0, 2, 3, 1, 4).reshape(b, h * w, 9, 2)
    ours = torch.matmul(weight.reshape(cout, -1), sample_features(feature, positions, stride, (h, w)))
    ref = deform_conv2d(feature, offset, weight, padding=(1, 1))
    assert torch.allclose(ours.reshape(b, cout, h, w), ref, atol=1e-4)
    # zero offsets: a plain 3x3 convolution ("PA" mode uses exactly this kernel)
    zero = torch.stack([(xs + grid[:, 1, None, None] + 0.5) * stride, (ys + grid[:, 0, None, None] + 0.5) * stride], -1)
    zero = zero.permute(1, 2, 0, 3).reshape(1, h * w, 9, 2).expand(b, -1, -1, -1)
    plain = torch.matmul(weight.reshape(cout, -1), sample_features(feature, zero, stride, (h, w)))
    assert torch.allclose(plain.reshape(b, cout, h, w), F.conv2d(feature, weight, padding=1), atol=1e-4)


def test_sample_features_on_a_coarser_level():
    """Sampling level l+1 at a cell centre of level l: bilinear between the coarse cell centres."""
    feature = torch.arange(16.0).reshape(1, 1, 4, 4)  # stride 16: cell centres at 8, 24, 40, 56
    positions = torch.tensor([[[[16.0, 8.0]], [[24.0, 24.0]], [[4.0, 8.0]]]]).reshape(1, 3, 1, 2)
    out = sample_features(feature, positions, 16, (1, 3))
    # x=16 is half-way between columns 0 and 1 of row 0 -> 0.5; (24,24) is cell (1,1) -> 5;
    # x=4 is a quarter cell left of column 0 -> 0.75 * 0 + 0.25 * (zero padding) = 0
    assert torch.allclose(out.flatten(), torch.tensor([0.5, 5.0, 0.0]))


def test_pyramid_landmark_feature_samples_every_level_at_the_same_pixels():
    """Pyramid DCN (§3.4): levels l-1, l, l+1 are sampled at the same *image* positions. Every level
    holds a ramp equal to its cell centres' x (channel 0) and y (channel 1) in pixels, so bilinear
    sampling of any level returns the pixel position itself; with kernels that copy one kernel
    point's x or y to one output channel, the fused landmark feature of an interior anchor must be
    exactly its 9 DCN positions (the mean of 2-3 equal values), for the cls and the reg branch."""
    from lsnet.coding import decode_offsets
    from lsnet.modeling.head import LSNetHead

    c, strides, sizes = 18, (8, 16, 32), [(16, 16), (8, 8), (4, 4)]  # a 128x128 image
    head = LSNetHead(c, NUM_CLASSES, 4, strides=strides, channels=c, num_convs=0, norm_groups=1,
                     feature_mode="PP", task="bbox")  # no tower convs: the towers are the inputs
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.init_out.weight.zero_()  # stage-1 vectors: [0.3, 1] x stride per component, no ties
        head.init_out.bias.copy_(torch.empty(16).uniform_(math.log(0.3), 0.0, generator=gen))
        for conv in (head.anchor_conv_cls, head.anchor_conv_reg):
            conv.weight.zero_()
            conv.bias.zero_()
        for weight in (head.landmark_weight_cls, head.landmark_weight_reg):
            weight.zero_()
            for k in range(9):
                weight[k, 0, k // 3, k % 3] = 1.0  # out k = x of kernel point k
                weight[9 + k, 1, k // 3, k % 3] = 1.0  # out 9 + k = its y
    feats = []
    for (h, w), s in zip(sizes, strides):
        f = torch.zeros(1, c, h, w)
        f[0, 0] = ((torch.arange(w) + 0.5) * s).expand(h, w)
        f[0, 1] = ((torch.arange(h) + 0.5) * s)[:, None].expand(h, w)
        feats.append(f)
    fused = {"cls": [], "reg": []}  # the input of GroupNorm = anchor-point (0 here) + landmark feature
    hooks = [getattr(head, f"norm_{b}").register_forward_pre_hook(lambda mod, args, b=b: fused[b].append(args[0]))
             for b in fused]
    with torch.no_grad():
        out = head(feats)
    for hook in hooks:
        hook.remove()
    assert [len(v) for v in fused.values()] == [3, 3]
    start = 0
    for level, (h, w) in enumerate(sizes):
        n = h * w
        anchors = out.anchors[start:start + n]
        positions = kernel_points(decode_offsets(out.vec_init[:, start:start + n], anchors), anchors, None)[0]
        expected = torch.cat([positions[..., 0], positions[..., 1]], dim=1).T  # (18, n)
        # interior: all 9 positions where the coarsest sampled level is still bilinear (not padding)
        coarse = min(level + 1, len(strides) - 1)
        s, (hc, wc) = strides[coarse], sizes[coarse]
        x, y = positions.unbind(-1)
        inside = ((x >= s / 2) & (x <= (wc - 0.5) * s) & (y >= s / 2) & (y <= (hc - 0.5) * s)).all(1)
        assert inside.sum() >= 4, level
        for branch, feats_b in fused.items():
            torch.testing.assert_close(feats_b[level][0][:, inside], expected[:, inside], atol=1e-3, rtol=1e-5,
                                       msg=lambda m, where=f"level {level} {branch}": f"{where}: {m}")
        start += n


def test_kernel_points_of_extreme_points():
    landmarks = torch.tensor([[[[5.0, 1.0], [2.0, 4.0], [6.0, 9.0], [8.0, 5.0]]]])  # top, left, bottom, right
    anchors = torch.tensor([[5.0, 5.0]])
    k = kernel_points(landmarks, anchors, None)[0, 0]
    expected = torch.tensor([[2, 1], [5, 1], [8, 1], [2, 4], [5, 5], [8, 5], [2, 9], [6, 9], [8, 9]], dtype=torch.float32)
    assert torch.equal(k, expected)
    assert default_dcn_point_indices("segm", 36) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert default_dcn_point_indices("pose", 17) == [0, 2, 4, 6, 8, 10, 12, 14, 16]


def _models_for_modes(task="bbox"):
    base = build_model(tiny_cfg(task, feature_mode="PP")).eval()
    models = {}
    for mode in ("PA", "PE", "PP"):
        m = build_model(tiny_cfg(task, feature_mode=mode)).eval()
        # the same weights: PE and PP share every parameter, PA lacks only the landmark kernels
        missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
        assert missing == []
        assert sorted(unexpected) == ([] if mode != "PA" else
                                      ["head.landmark_weight_cls", "head.landmark_weight_reg"])
        models[mode] = m
    return models


def test_ablation_switches_change_the_computation():
    models = _models_for_modes()
    images, _ = two_image_batch()
    with torch.no_grad():
        outs = {mode: m.forward_raw(images) for mode, m in models.items()}
    # stage 1 does not depend on the mode ...
    assert torch.equal(outs["PA"].vec_init, outs["PE"].vec_init)
    assert torch.equal(outs["PE"].vec_init, outs["PP"].vec_init)
    # ... stage 2 does, for every pair of modes
    for a, b in (("PA", "PE"), ("PE", "PP"), ("PA", "PP")):
        assert not torch.allclose(outs[a].cls_logits, outs[b].cls_logits, atol=1e-6), (a, b)
        assert not torch.allclose(outs[a].vec_refine, outs[b].vec_refine, rtol=1e-6), (a, b)


def test_landmark_offsets_receive_scaled_gradient():
    """With beta = 0 the stage-1 branch learns only through the DCN sampling positions: a gradient in
    PE/PP scaled by dcn_offset_grad_scale, none in PA (anchor-point features only)."""
    images, _ = two_image_batch()
    targets = [make_targets("bbox", 4, [[10, 12, 70, 80]], [0]), make_targets("bbox", 4, [[5, 30, 75, 120]], [1])]
    grads = {}
    ref = build_model(tiny_cfg("bbox"))
    for mode, scale in (("PA", 0.1), ("PP", 0.1), ("PP", 1.0)):
        cfg = tiny_cfg("bbox", feature_mode=mode, dcn_offset_grad_scale=scale)
        cfg.loss.beta = 0.0
        model = build_model(cfg).train()
        model.load_state_dict(ref.state_dict(), strict=mode != "PA")
        model(images, targets)["loss"].backward()
        grads[(mode, scale)] = model.head.init_out.weight.grad.clone()
    assert torch.count_nonzero(grads[("PA", 0.1)]) == 0
    assert grads[("PP", 1.0)].abs().sum() > 0
    assert torch.allclose(grads[("PP", 0.1)], 0.1 * grads[("PP", 1.0)], rtol=1e-3, atol=1e-9)


def test_backbone_dcn_offsets_get_gradients():
    cfg = tiny_cfg("bbox", dcn_stages=[3, 4, 5])
    model = build_model(cfg).train()
    images, _ = two_image_batch()
    targets = [make_targets("bbox", 4, [[10, 12, 70, 80]], [0]), make_targets("bbox", 4, [[5, 30, 75, 120]], [1])]
    model(images, targets)["loss"].backward()
    offset_convs = [m.offset for m in model.backbone.modules() if hasattr(m, "offset")]
    assert len(offset_convs) == 6  # 2 BasicBlocks in each of c3, c4, c5
    for conv in offset_convs:
        assert torch.count_nonzero(conv.weight) == 0  # zero-initialised: starts as the plain conv
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# frozen stages, frozen BN, pretrained weights
# ---------------------------------------------------------------------------------------------
def test_frozen_stages_and_norm_eval():
    cfg = tiny_cfg("bbox", frozen_stages=1, norm_eval=True)
    model = build_model(cfg).train()
    bb = model.backbone
    assert all(not p.requires_grad for p in bb.stem.parameters())
    assert all(not p.requires_grad for p in bb.layer1.parameters())
    assert all(p.requires_grad for p in bb.layer2.parameters())
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    before = copy.deepcopy(bb.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, _ = two_image_batch()
    targets = [make_targets("bbox", 4, [[10, 12, 70, 80]], [0]), make_targets("bbox", 4, [[5, 30, 75, 120]], [1])]
    model(images, targets)["loss"].backward()
    opt.step()
    after = bb.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        frozen = name.startswith(("stem.", "layer1.")) or "bn" in name or "downsample.1" in name
        assert changed != frozen, name


def test_frozen_stages_keep_batchnorm_statistics_without_norm_eval():
    backbone = ResNetBackbone("resnet18", None, frozen_stages=1, norm_eval=False).train()
    assert backbone.stem[1].training is False and backbone.layer1.training is False
    assert backbone.layer2.training is True
    stem_mean = backbone.stem[1].running_mean.clone()
    layer2_mean = backbone.layer2[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(backbone.stem[1].running_mean, stem_mean)
    assert not torch.equal(backbone.layer2[0].bn1.running_mean, layer2_mean)


def test_pretrained_weights_unavailable_gives_clear_error(monkeypatch, tmp_path):
    import torchvision.models._api as api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", no_network)
    with pytest.raises(PretrainedWeightsError) as err:
        ResNetBackbone("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    msg = str(err.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg and "resnet18-f37072fd.pth" in msg
    assert "model.pretrained" in msg and "local path" in msg
    with pytest.raises(PretrainedWeightsError, match="neither a torchvision weights name"):
        ResNetBackbone("resnet18", "ResNet18_Weights.NOPE")
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        ResNetBackbone("resnet18", str(tmp_path / "missing.pth"))


def test_pretrained_from_local_checkpoint(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    backbone = ResNetBackbone("resnet18", str(path), frozen_stages=-1, norm_eval=True, dcn_stages=[5])
    assert torch.equal(backbone.stem[0].weight, source.conv1.weight)
    assert torch.equal(backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    # the DCN takes over the pretrained 3x3 kernel
    assert torch.equal(backbone.layer4[0].conv2.conv.weight, source.layer4[0].conv2.weight)
    torch.save({"model": {"backbone.body." + k: v for k, v in source.state_dict().items()}}, tmp_path / "wrapped.pth")
    wrapped = ResNetBackbone("resnet18", str(tmp_path / "wrapped.pth"))
    assert torch.equal(wrapped.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(PretrainedWeightsError, match="do not fit resnet18"):
        ResNetBackbone("resnet18", str(tmp_path / "r34.pth"))


# ---------------------------------------------------------------------------------------------
# post-processing and test-time augmentation
# ---------------------------------------------------------------------------------------------
def _hand_outputs():
    """One image, two levels of one point each (strides 8 and 16), two classes, N=4."""
    logit = lambda p: torch.logit(torch.tensor(p)).item()
    cls = torch.tensor([[[logit(0.9), logit(0.04)], [logit(0.8), logit(0.3)]]])
    anchors = torch.tensor([[20.0, 20.0], [24.0, 24.0]])
    # vectors [top, bottom, left, right] per landmark (top, left, bottom, right points)
    v0 = torch.tensor([[10, 0, 0, 0], [0, 0, 10, 0], [0, 10, 0, 0], [0, 0, 0, 30]], dtype=torch.float32)
    v1 = torch.tensor([[14, 0, 0, 0], [0, 0, 14, 0], [0, 6, 0, 0], [0, 0, 0, 26]], dtype=torch.float32)
    vec = torch.stack([v0, v1])[None]
    return HeadOutputs(cls, vec, vec, anchors, [1, 1], (8, 16))


def test_postprocess_hand_computed():
    out = _hand_outputs()
    cfg = ModelConfig(task="bbox", num_classes=2)
    dets = postprocess(out, [(40, 40)], cfg, (48, 48))[0]
    # candidates: (p0, c0, 0.9), (p1, c0, 0.8), (p1, c1, 0.3); p0 c1 is below 0.05.
    # p0 box: x 10..50 -> clipped to 40, y 10..30; p1 box: x 10..50 -> 40, y 10..30: identical boxes,
    # so class-aware NMS removes (p1, c0) and keeps (p1, c1) of the other class.
    assert torch.allclose(dets.scores, torch.tensor([0.9, 0.3]))
    assert dets.labels.tolist() == [0, 1]
    assert torch.allclose(dets.boxes, torch.tensor([[10.0, 10.0, 40.0, 30.0]] * 2))
    assert torch.allclose(dets.points[0], torch.tensor([[20.0, 10.0], [10.0, 20.0], [20.0, 30.0], [40.0, 20.0]]))
    cfg.test.max_dets = 1
    assert len(postprocess(out, [(40, 40)], cfg, (48, 48))[0]) == 1
    cfg.test.max_dets, cfg.test.score_thr = 100, 0.5
    assert postprocess(out, None, cfg, (48, 48))[0].scores.tolist() == pytest.approx([0.9])
    cfg.test.score_thr, cfg.test.nms_iou = 0.05, 1.0  # NMS off: all 3 candidates
    assert len(postprocess(out, None, cfg, (48, 48))[0]) == 3
    cfg.test.pre_nms_topk = 1  # one per level
    assert sorted(postprocess(out, None, cfg, (48, 48))[0].scores.tolist()) == pytest.approx([0.8, 0.9])


@pytest.mark.parametrize("task,pose_box", [("bbox", "kps"), ("pose", "kps"), ("pose", "obj")])
def test_tta_identity_and_flip_equivariance(task, pose_box):
    cfg = tiny_cfg(task, pose_box=pose_box)
    cfg.test.score_thr = 0.0
    cfg.test.max_dets = 20
    model = build_model(cfg).eval()
    torch.manual_seed(3)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        plain = model(images)[0]
    tta = predict_with_tta(model, images, None, flip=False, scales=(1.0,))[0]
    assert torch.equal(plain.boxes, tta.boxes) and torch.equal(plain.points, tta.points)
    # flip TTA on the mirrored image = the mirror of flip TTA on the image (same candidate sets)
    from lsnet.transforms import hflip_points

    a = predict_with_tta(model, images, None, flip=True)[0]
    b = predict_with_tta(model, images.flip(-1), None, flip=True)[0]
    assert torch.allclose(a.scores, b.scores)
    assert torch.allclose(hflip_points(a.points, 128, task), b.points, atol=1e-4)
    from lsnet.transforms import hflip_boxes

    assert torch.allclose(hflip_boxes(a.boxes, 128), b.boxes, atol=1e-4)
    # multi-scale with merge="nms": one NMS over the union of the scales' candidates, so every merged detection is one
    # of a single-scale run's (same score, same points) and the best of them all survives. (Where
    # each scale maps its points back to: test_tta_multiscale_maps_back_to_image_pixels.)
    metas = [(90, 120)]
    ms = predict_with_tta(model, images, metas, flip=True, scales=(0.75, 1.25), merge="nms")[0]
    singles = [predict_with_tta(model, images, metas, flip=True, scales=(s,), merge="nms")[0] for s in (0.75, 1.25)]
    pool_scores = torch.cat([d.scores for d in singles])
    pool_points = torch.cat([d.points for d in singles])
    assert ms.scores[0] == pool_scores.max()
    for score, points in zip(ms.scores, ms.points):
        same = (pool_scores == score) & (pool_points - points).abs().flatten(1).amax(1).le(1e-5)
        assert same.any(), f"merged detection (score {score:.4f}) is in no single-scale result"
    assert len(ms) == 20 and len(pool_scores) == 40  # max_dets per run (score_thr 0: plenty of candidates)
    assert not torch.equal(singles[0].points, singles[1].points)  # the two scales do see different inputs


class FractionStub(torch.nn.Module):
    """A "model" with one confident detection (label 1) whose extreme points lie at fixed fractions
    of the valid (non-zero) region of each image it is given, wherever that region is resized to."""

    BOX = (0.2, 0.25, 0.5, 0.7)  # x1, y1, x2, y2 as fractions of the valid width / height

    def __init__(self):
        super().__init__()
        self.cfg = tiny_cfg("bbox")

    def forward_raw(self, x):
        b = x.shape[0]
        vec = torch.zeros(b, 1, 4, 4)
        for i in range(b):
            valid = x[i].abs().sum(0) > 1e-3
            h, w = valid.any(1).sum().item(), valid.any(0).sum().item()
            x1, y1, x2, y2 = (f * s for f, s in zip(self.BOX, (w, h, w, h)))
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            # one anchor at (0, 0): every landmark is (dx, dy) > 0 -> components [0, dy, 0, dx]
            for k, (px, py) in enumerate(((cx, y1), (x1, cy), (cx, y2), (x2, cy))):  # top, left, bottom, right
                vec[i, 0, k] = torch.tensor([0.0, py, 0.0, px])
        logits = torch.full((b, 1, NUM_CLASSES), -10.0)
        logits[:, :, 1] = 10.0
        return HeadOutputs(logits, vec, vec, torch.zeros(1, 2), [1], (8,))


def _box_at_fractions(fractions, size):
    h, w = size
    x1, y1, x2, y2 = fractions
    return torch.tensor([x1 * w, y1 * h, x2 * w, y2 * h])


@pytest.mark.parametrize("scales", [(0.5,), (2.0,), (0.5, 1.0, 2.0)])
def test_tta_multiscale_maps_back_to_image_pixels(scales):
    """Whatever the scale, a detection at fractions of the resized image comes back at the same
    fractions of the original valid region (divide by the scale, not multiply)."""
    images = torch.zeros(2, 3, 96, 128)
    sizes = [(90, 120), (64, 96)]
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = 1.0
    stub = FractionStub()
    for flip in (False, True):
        dets = predict_with_tta(stub, images, sizes, flip=flip, scales=scales)
        for det, size in zip(dets, sizes):
            x1, y1, x2, y2 = FractionStub.BOX
            expected = [_box_at_fractions(FractionStub.BOX, size)]
            if flip:  # the flipped pass finds the mirror image of the box (IoU 0: both kept)
                expected.append(_box_at_fractions((1 - x2, y1, 1 - x1, y2), size))
            assert len(det) == len(expected), f"scales {scales}, flip {flip}: {len(det)} detections"
            boxes = det.boxes[det.boxes[:, 0].argsort()]
            torch.testing.assert_close(boxes, torch.stack(expected), atol=1.0, rtol=0,
                                       msg=lambda m, where=f"scales {scales}, flip {flip}, image {size}": f"{where}: {m}")
            # the landmarks too: top/bottom at the box's x centre, left/right at its y centre
            top = det.points[:, 0]
            assert torch.allclose(top[:, 1], boxes[:, 1].sort().values, atol=1.0)
            assert det.labels.tolist() == [1] * len(expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_give_the_same_loss():
    cfg = tiny_cfg("segm")
    model = build_model(cfg).train()
    images, _ = two_image_batch()
    targets = [make_targets("segm", 36, [[10, 12, 70, 80]], [0]), make_targets("segm", 36, [[5, 30, 75, 120]], [1])]
    cpu = model(images, targets)
    gpu = model.cuda()(images.cuda(), [t.to("cuda") for t in targets])
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k].cpu(), atol=1e-4), k


def test_dcnv2_is_torchvision_modulated_deform_conv_and_starts_at_half_the_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 6, 11, 13)
    v1, v2 = DeformableConv(conv), DeformableConv(conv, modulated=True)
    assert v2.offset.out_channels == 27 and v1.offset.out_channels == 18
    torch.testing.assert_close(v1(x), conv(x), rtol=1e-5, atol=1e-5)
    # zero-initialised as mmcv's ModulatedDeformConv2dPack: offsets 0, masks sigmoid(0) = 0.5
    torch.testing.assert_close(v2(x), 0.5 * conv(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        v2.offset.weight.normal_(0, 0.1)
        v2.offset.bias.normal_(0, 0.5)
    out = v2.offset(x)
    expected = deform_conv2d(x, out[:, :18], conv.weight, stride=2, padding=1, mask=torch.sigmoid(out[:, 18:]))
    torch.testing.assert_close(v2(x), expected)
    assert not torch.allclose(v2(x), 0.5 * conv(x), atol=1e-3)
    v2(x).sum().backward()
    assert v2.offset.weight.grad.abs().sum() > 0


def test_dcn_type_is_selected_per_config():
    model = build_model(tiny_cfg("bbox", dcn_stages=[4, 5], dcn_type="v2"))
    dcns = [m for m in model.backbone.modules() if hasattr(m, "modulated")]
    assert len(dcns) == 4 and all(m.modulated and m.offset.out_channels == 27 for m in dcns)
    assert not any(hasattr(m, "modulated") for m in model.backbone.layer2.modules())
    with pytest.raises(ValueError, match="dcn_type"):
        ModelConfig(dcn_type="v3")


def test_res2net_from_timm_with_dcn_frozen_stages_and_pretrained_handling(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from timm.models import _builder as timm_builder

    torch.manual_seed(0)
    bb = ResNetBackbone("res2net50_26w_4s", None, frozen_stages=1, norm_eval=True, dcn_stages=[3, 4, 5],
                        dcn_type="v2").train()
    assert bb.out_channels == [512, 1024, 2048]
    # DCN in every 3x3 conv of every block of c3-c5 (3 scales per block), none in c2
    for layer, blocks in ((bb.layer2, 4), (bb.layer3, 6), (bb.layer4, 3)):
        assert sum(isinstance(m, DeformableConv) for m in layer.modules()) == 3 * blocks
    assert not any(isinstance(m, DeformableConv) for m in bb.layer1.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())  # frozen BN
    assert all(not p.requires_grad for p in bb.stem.parameters()) and all(not p.requires_grad for p in bb.layer1.parameters())
    for m in bb.modules():  # timm zero-initialises each block's last BN scale: no gradient would flow
        if "FrozenBatchNorm2d" in type(m).__name__:
            m.weight.fill_(1.0)
    x = torch.randn(1, 3, 64, 64)
    c3, c4, c5 = bb(x)
    assert (c3.shape[-1], c4.shape[-1], c5.shape[-1]) == (8, 4, 2)
    (c3.mean() + c4.mean() + c5.mean()).backward()
    assert bb.layer2[0].convs[0].offset.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.stem.parameters())
    # a local file in timm's key layout is accepted (the classifier is ignored); a wrong one is refused
    import timm

    source = timm.create_model("res2net50_26w_4s")
    torch.save(source.state_dict(), tmp_path / "r2.pth")
    loaded = ResNetBackbone("res2net50_26w_4s", str(tmp_path / "r2.pth"), dcn_stages=[5])
    assert torch.equal(loaded.layer3[0].convs[1].weight, source.layer3[0].convs[1].weight)
    assert torch.equal(loaded.layer4[0].convs[1].conv.weight, source.layer4[0].convs[1].weight)  # into the DCN
    with pytest.raises(PretrainedWeightsError, match="do not fit res2net50d"):
        ResNetBackbone("res2net50d", str(tmp_path / "r2.pth"))

    # no network: one clear error naming the weights and how to supply a local file
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm_builder, "load_pretrained", offline)
    with pytest.raises(PretrainedWeightsError) as err:
        ResNetBackbone("res2net50d", "timm")
    assert "timm/res2net50d" in str(err.value) and "model.pretrained" in str(err.value)
    with pytest.raises(PretrainedWeightsError, match="for the timm backbones"):
        ResNetBackbone("resnet18", "timm")


def test_pose_box_branch_config_loss_and_decoding():
    from lsnet.modeling.detector import with_box_landmarks
    from lsnet.modeling.inference import select_candidates

    assert tiny_cfg("pose", pose_box="obj").pose_box_vectors and not tiny_cfg("pose").pose_box_vectors
    with pytest.raises(ValueError, match="pose task only"):
        tiny_cfg("bbox", pose_box_vectors=True)
    cfg = tiny_cfg("pose", pose_box="obj")
    model = build_model(cfg).train()
    assert model.head.num_points == 21 and model.head.point_indices == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    # targets: the box's edge midpoints appended (top, left, bottom, right), always visible
    t = make_targets("pose", 17, [[10, 12, 70, 80]], [0])
    ext = with_box_landmarks(t)
    assert ext.points[0, 17:].tolist() == [[40, 12], [10, 46], [40, 80], [70, 46]] and ext.visible[0, 17:].all()
    # a person without labelled keypoints (obj-box keeps it): no keypoint loss, a box loss
    images, _ = two_image_batch()
    unlabelled = make_targets("pose", 17, [[10, 12, 70, 80]], [0])
    unlabelled.visible[:] = False
    losses = model(images, [unlabelled, make_targets("pose", 17, [], [])])
    assert losses["loss_vec_init"] == 0 and losses["loss_vec_refine"] == 0
    assert losses["loss_box_init"] > 0 and losses["loss_box_refine"] > 0
    lc = cfg.loss
    expected = (losses["loss_cls"] + lc.box_beta * losses["loss_box_init"] + lc.box_gamma * losses["loss_box_refine"])
    assert torch.allclose(losses["loss"], expected) and (lc.box_beta, lc.box_gamma) == (0.1, 0.2)
    losses["loss"].backward()
    assert model.head.init_out.weight.grad[17 * 4:].abs().sum() > 0  # the box vectors learn
    # decoding: the box comes from the 4 box landmarks, the 17 keypoints are the points
    vectors = torch.zeros(1, 21, 4)
    vectors[0, :17] = torch.tensor([2.0, 2.0, 2.0, 2.0])  # keypoints: a 2-px cluster at the anchor
    vectors[0, 17:] = torch.tensor([[30.0, 0, 0, 0], [0, 0, 20.0, 0], [0, 40.0, 0, 0], [0, 0, 0, 25.0]])
    dets = select_candidates(torch.tensor([[5.0]]), vectors, torch.tensor([[50.0, 60.0]]), [1], (200, 200),
                             with_point_scores=True, num_box_points=4)
    assert dets.points.shape == (1, 17, 2) and dets.point_scores.shape == (1, 17)
    assert dets.boxes.tolist() == [[30.0, 30.0, 75.0, 100.0]]


def test_atss_on_init_assigns_with_the_stage1_boxes(monkeypatch):
    from lsnet.coding import decode_offsets
    from lsnet.modeling import detector

    with pytest.raises((ValueError, ConfigError), match="atss_on"):
        from_dict(ModelConfig, {"loss": {"atss_on": "boxes"}})
    images, _ = two_image_batch()
    targets = [make_targets("bbox", 4, [[10, 12, 70, 80]], [0]), make_targets("bbox", 4, [[5, 30, 75, 120]], [1])]
    model = build_model(tiny_cfg("bbox")).train()
    out = model.forward_raw(images)
    seen = []
    real = detector.assign_atss
    monkeypatch.setattr(detector, "assign_atss", lambda *a, **kw: seen.append(kw["anchor_boxes"]) or real(*a, **kw))
    cfg_anchors, cfg_init = tiny_cfg("bbox"), tiny_cfg("bbox")
    assert cfg_init.loss.atss_on == "init"  # the default, from the overfit measurement (issue 11 item 10)
    cfg_anchors.loss.atss_on = "anchors"
    by_anchors = detector.compute_losses(out, targets, cfg_anchors)
    assert seen == [None, None]
    by_init = detector.compute_losses(out, targets, cfg_init)
    pts = decode_offsets(out.vec_init[1].detach(), out.anchors)
    assert torch.equal(seen[3], torch.cat([pts.amin(1), pts.amax(1)], dim=1))
    # an untrained stage 1 predicts boxes of ~1 stride: other positives than the 8-stride squares
    assert not torch.equal(by_anchors["loss_cls"], by_init["loss_cls"])


def test_centre_vector_targets_follow_the_head_layout_and_train():
    """With ``model.center_vector`` the targets are ordered as the reference head's vectors: the task's
    N landmarks, their centre, then (pose box branch) the box's 4 edge midpoints and the box centre;
    the reference loss trains them all and ATSS / pos_iou never read a centre as a landmark."""
    from lsnet.modeling.detector import box_landmark_vectors, regression_targets

    cfg = tiny_cfg("pose", pose_box="obj", head="reference", center_vector=True,
                   loss=LossConfig(vector_loss_form="reference"))
    t = make_targets("pose", 17, [[10, 12, 70, 80]], [0])
    ordered = regression_targets(t, cfg)
    assert ordered.num_points == 17 + 1 + 4 + 1 and ordered.visible[0, 17:].all()
    assert ordered.points[0, 17].tolist() == [40, 46]  # the person box's centre, after the keypoints
    assert ordered.points[0, 18:22].tolist() == [[40, 12], [10, 46], [40, 80], [70, 46]]
    assert ordered.points[0, 22].tolist() == [40, 46]  # the box branch's own centre, last
    vectors = torch.arange(23 * 4, dtype=torch.float32).reshape(1, 23, 4)
    assert torch.equal(box_landmark_vectors(vectors, cfg), vectors[:, 18:22])  # the box vectors, no centre
    bbox = tiny_cfg("bbox", head="reference", center_vector=True, loss=LossConfig(vector_loss_form="reference"))
    assert regression_targets(make_targets("bbox", 4, [[10, 12, 70, 80]], [0]), bbox).points[0, 4].tolist() == [40, 46]
    assert torch.equal(box_landmark_vectors(vectors[:, :5], bbox), vectors[:, :4])
    # a training step of the reference head with the centre vector: every loss term finite and learning
    torch.manual_seed(0)
    model = build_model(bbox).train()
    images, _ = two_image_batch()
    losses = model(images, [make_targets("bbox", 4, [[10, 12, 70, 80]], [1]),
                            make_targets("bbox", 4, [[20, 20, 60, 50]], [2])])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_vec_init"] > 0
    assert 0 <= float(losses["pos_iou"]) <= 1
    losses["loss"].backward()
