import numpy as np
import pytest
import torch
from PIL import Image

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import (
    PreprocessConfig,
    eval_transform,
    finetune_transform,
    preprocess_pil,
    resize_size_for,
    resized_dims,
    resolve_preprocess,
)


def _image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    # smooth structure too, so interpolation differences would show
    arr[: h // 2, : w // 3] = 200
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


def test_resize_size_follows_crop_pct():
    assert resize_size_for(224, 0.875) == 256
    assert PreprocessConfig(test_input_size=384).resize_size == 438
    assert PreprocessConfig(test_input_size=160, crop_pct=1.0).resize_size == 160


def test_resized_dims_shorter_vs_height():
    assert resized_dims(500, 375, 256, "shorter") == (341, 256)
    assert resized_dims(375, 500, 256, "shorter") == (256, 341)
    # FixRes' resize scales the height whatever the orientation
    assert resized_dims(375, 500, 256, "height") == (192, 256)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 300), (97, 151), (64, 60)])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_numpy_runtime_matches_torchvision_eval_transform(size, interp):
    cfg = PreprocessConfig(test_input_size=96, crop_pct=0.875, interpolation=interp)
    img = _image(*size)
    ref = eval_transform(cfg)(img).numpy()
    ours = preprocess_pil(img, cfg)
    assert ours.shape == ref.shape == (3, 96, 96)
    assert np.abs(ours - ref).max() < 1e-5


def test_height_mode_and_greyscale_inputs():
    cfg = PreprocessConfig(test_input_size=64, resize_mode="height")
    for mode in ("L", "RGB"):
        img = _image(90, 140, mode=mode)
        ref = eval_transform(cfg)(img).numpy()
        assert np.abs(preprocess_pil(img, cfg) - ref).max() < 1e-5


def test_roundtrip_and_validation():
    cfg = PreprocessConfig(test_input_size=160, train_input_size=128, crop_pct=0.9, mean=(0.5, 0.5, 0.5))
    again = PreprocessConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(UserInputError, match="unknown preprocessing keys"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(UserInputError, match="inconsistent"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "resize_size": 999})
    with pytest.raises(UserInputError, match="crop_pct"):
        PreprocessConfig(test_input_size=64, crop_pct=0)
    with pytest.raises(UserInputError, match="interpolation"):
        PreprocessConfig(test_input_size=64, interpolation="area")


def test_resolve_precedence():
    base = PreprocessConfig(test_input_size=64, crop_pct=0.8, mean=(0.1, 0.2, 0.3)).to_dict()
    cfg = resolve_preprocess(base, test_input_size=96, default_mean=(0.5, 0.5, 0.5))
    assert cfg.test_input_size == 96 and cfg.crop_pct == 0.8 and cfg.mean == (0.1, 0.2, 0.3)
    assert cfg.train_input_size == 64  # the checkpoint's resolution is the training one
    cfg2 = resolve_preprocess(None, test_input_size=96, default_mean=(0.5, 0.5, 0.5), default_std=(0.5, 0.5, 0.5))
    assert cfg2.mean == (0.5, 0.5, 0.5)
    with pytest.raises(UserInputError, match="--resolution"):
        resolve_preprocess(None)


def test_finetune_augmentations_shapes_and_determinism():
    cfg = PreprocessConfig(test_input_size=64)
    img = _image(200, 150)
    a = finetune_transform(cfg, "test")(img)
    b = finetune_transform(cfg, "test")(img)
    assert torch.equal(a, b)  # test DA is deterministic: cacheable
    torch.manual_seed(0)
    outs = [finetune_transform(cfg, "test2")(img) for _ in range(4)]
    assert all(o.shape == (3, 64, 64) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert finetune_transform(cfg, "train")(img).shape == (3, 64, 64)
    with pytest.raises(UserInputError):
        finetune_transform(cfg, "mixup")
