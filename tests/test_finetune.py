import copy

import pytest
import torch

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.data.folders import index_image_folder
from fixres_deploy.fixres.finetune import (
    FinetuneOptions,
    TailSplit,
    discover_fixres_modules,
    fixres_finetune,
    resolve_fixres_modules,
)
from fixres_deploy.models.registry import build_model


@pytest.mark.parametrize(
    "spec, bns, head",
    [
        ("torchvision:resnet18", ["layer4.1.bn2"], ["fc"]),
        ("torchvision:resnet50", ["layer4.2.bn3"], ["fc"]),
        ("torchvision:mobilenet_v3_small", ["features.12.1"], ["classifier.0", "classifier.3"]),
        ("torchvision:mobilenet_v2", ["features.18.1"], ["classifier.1"]),
        ("torchvision:efficientnet_b0", ["features.8.1"], ["classifier.1"]),
        ("torchvision:regnet_x_400mf", ["trunk_output.block4.block4-11.f.c.1"], ["fc"]),
        ("fixres:tiny_resnet", ["layer4.0.bn2", "layer4.0.downsample.1"], ["fc"]),
    ],
)
def test_prepool_bn_discovery(spec, bns, head):
    model, _, _ = build_model(spec, 10)
    mods = discover_fixres_modules(model)
    assert sorted(mods.bn_names) == sorted(bns)
    assert mods.head_names == head


def test_user_named_modules_are_checked():
    model, _, _ = build_model("torchvision:resnet18", 10)
    mods = resolve_fixres_modules(model, bn=["layer4.0.bn2"])
    assert mods.bn_names == ["layer4.0.bn2"] and mods.method == "user"
    with pytest.raises(UserInputError, match="not in the model"):
        resolve_fixres_modules(model, bn=["layer9.bn"])
    with pytest.raises(UserInputError, match="not a BatchNorm"):
        resolve_fixres_modules(model, bn=["layer4.0.conv1"])


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "fixres:tiny_resnet"])
def test_tail_split_reproduces_the_model(spec):
    model, _, _ = build_model(spec, 10)
    model.eval()
    mods = discover_fixres_modules(model)
    split = TailSplit(model, mods.bn_names)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        got = split.tail(*split.trunk(x))
    assert torch.allclose(ref, got, atol=1e-5)
    assert len(split.frontier_names) >= 1


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def small_train(demo_small):
    return index_image_folder(f"{demo_small}/train")


def test_only_intended_tensors_change(small_train):
    torch.manual_seed(0)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    model.eval()
    mods = discover_fixres_modules(model)
    before = _snapshot(model)
    cfg = PreprocessConfig(test_input_size=64)
    fixres_finetune(model, small_train, cfg, FinetuneOptions(epochs=2, batch_size=32, lr=0.05, workers=0), mods=mods)
    after = _snapshot(model)
    allowed = set()
    for name in mods.head_names:
        allowed |= {f"{name}.weight", f"{name}.bias"}
    for name in mods.bn_names:
        allowed |= {f"{name}.running_mean", f"{name}.running_var", f"{name}.num_batches_tracked"}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert changed <= allowed, f"frozen tensors changed: {sorted(changed - allowed)}"
    assert {"fc.weight", "layer4.0.bn2.running_mean"} <= changed
    # BN affine parameters stay frozen by default (the reference does not train them)
    assert torch.equal(before["layer4.0.bn2.weight"], after["layer4.0.bn2.weight"])
    # requires_grad flags are restored and the model is back in eval mode
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_train_bn_affine_option_and_stats_only(small_train):
    cfg = PreprocessConfig(test_input_size=64)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    model.eval()
    before = _snapshot(model)
    fixres_finetune(
        model, small_train, cfg, FinetuneOptions(epochs=1, batch_size=32, lr=0.05, train_bn_affine=True, workers=0)
    )
    assert not torch.equal(before["layer4.0.bn2.weight"], model.state_dict()["layer4.0.bn2.weight"])

    model2, _, _ = build_model("fixres:tiny_resnet", 10)
    model2.eval()
    before2 = _snapshot(model2)
    stats = fixres_finetune(model2, small_train, cfg, FinetuneOptions(bn_stats_only=True, workers=0))
    after2 = model2.state_dict()
    changed = {k for k in before2 if not torch.equal(before2[k], after2[k])}
    assert changed == {
        f"{bn}.{b}"
        for bn in ("layer4.0.bn2", "layer4.0.downsample.1")
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert stats.steps == 0
    # the statistics are the exact mean of the BN input over the data (cumulative average)
    split = TailSplit(model2, ["layer4.0.bn2"])
    from fixres_deploy.core.preprocess import eval_transform
    from fixres_deploy.data.folders import make_loader

    feats = []
    with torch.no_grad():
        for images, _, _, _ in make_loader(small_train, eval_transform(cfg), batch_size=64, workers=0):
            frontier = split.trunk(images)
            idx = split.frontier_names.index(next(n for n in split.frontier_names if "conv2" in n))
            feats.append(frontier[idx])
    f = torch.cat(feats)
    assert torch.allclose(after2["layer4.0.bn2.running_mean"], f.mean(dim=(0, 2, 3)), atol=1e-4)


def test_cached_equals_naive(small_train):
    """The activation cache is an optimisation only: same batches, same result."""
    cfg = PreprocessConfig(test_input_size=64)
    torch.manual_seed(0)
    base, _, _ = build_model("fixres:tiny_resnet", 10)
    base.eval()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(epochs=2, batch_size=32, lr=0.05, workers=0, final_bn_pass=True)
    sa = fixres_finetune(a, small_train, cfg, FinetuneOptions(cache=True, **opts))
    sb = fixres_finetune(b, small_train, cfg, FinetuneOptions(cache=False, **opts))
    assert sa.mode == "cached" and sb.mode == "naive" and sa.steps == sb.steps
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-4, rtol=1e-3), k


def test_non_cacheable_augmentation_uses_naive_loop(small_train):
    cfg = PreprocessConfig(test_input_size=64)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    model.eval()
    stats = fixres_finetune(model, small_train, cfg, FinetuneOptions(epochs=1, augmentation="test2", workers=0))
    assert stats.mode == "naive" and stats.steps > 0


def test_efficientnet_lite0_cache_size_and_cached_finetune(small_train):
    """efficientnet_lite0's tail needs x.size(0) (an int): the cut recomputes it, the cache holds tensors only."""
    from fixres_deploy.fixres.finetune import _estimate_cache_bytes

    torch.manual_seed(0)
    model, _, _ = build_model("fixres:efficientnet_lite0", 10)
    model.eval()
    mods = discover_fixres_modules(model)
    split = TailSplit(model, mods.bn_names)
    x = torch.randn(3, 3, 64, 64)
    per_image = _estimate_cache_bytes(split.trunk, x)
    assert per_image == 1280 * 2 * 2 * 4  # the one cached tensor: 1280 channels at 2x2, fp32
    assert _estimate_cache_bytes(split.trunk, x, "fp16") == per_image // 2
    with torch.no_grad():  # the tail runs at another batch size than the trunk's probe
        assert torch.allclose(split.tail(*[t[:2] for t in split.trunk(x)]), model(x[:2]), atol=1e-5)
    stats = fixres_finetune(
        model, small_train, PreprocessConfig(test_input_size=64), FinetuneOptions(epochs=1, batch_size=32, workers=0)
    )
    assert stats.mode == "cached" and stats.steps > 0


def test_cache_over_budget_streams_and_says_so(small_train, caplog):
    cfg = PreprocessConfig(test_input_size=64)
    torch.manual_seed(0)
    base, _, _ = build_model("fixres:tiny_resnet", 10)
    base.eval()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(epochs=1, batch_size=32, lr=0.05, workers=0)
    with caplog.at_level("WARNING"):
        sa = fixres_finetune(a, small_train, cfg, FinetuneOptions(cache_budget_gb=1e-6, **opts))
    assert sa.mode == "naive" and "over the" in sa.cache_note and "streaming" in caplog.text
    sb = fixres_finetune(b, small_train, cfg, FinetuneOptions(**opts))
    assert sb.mode == "cached" and sb.cache_note == ""
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(va.float(), vb.float(), atol=1e-4, rtol=1e-3), k


def test_fp16_and_disk_cache(small_train, tmp_path):
    """On disk (memory-mapped, per rank) equals in memory; fp16 halves the bytes and stays close."""
    cfg = PreprocessConfig(test_input_size=64)
    torch.manual_seed(0)
    base, _, _ = build_model("fixres:tiny_resnet", 10)
    base.eval()
    models = [copy.deepcopy(base) for _ in range(3)]
    opts = dict(epochs=1, batch_size=32, lr=0.05, workers=0)
    s_mem = fixres_finetune(models[0], small_train, cfg, FinetuneOptions(**opts))
    s_disk = fixres_finetune(models[1], small_train, cfg, FinetuneOptions(cache_dir=str(tmp_path), **opts))
    s_half = fixres_finetune(models[2], small_train, cfg, FinetuneOptions(cache_dtype="fp16", **opts))
    assert list((tmp_path / "rank0").glob("frontier*.fp32.npy"))
    assert s_disk.cache_bytes == s_mem.cache_bytes and s_half.cache_bytes * 2 == s_mem.cache_bytes
    sd = [m.state_dict() for m in models]
    for k in sd[0]:
        assert torch.equal(sd[0][k], sd[1][k]), k
        assert torch.allclose(sd[0][k].float(), sd[2][k].float(), atol=1e-2, rtol=1e-2), k
    with pytest.raises(UserInputError, match="cache_dtype"):
        fixres_finetune(models[0], small_train, cfg, FinetuneOptions(cache_dtype="int8", **opts))
