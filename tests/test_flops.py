"""FLOPs from the ONNX graph: hand counts on a tiny model, resnet18's known 1.8 GMACs, precision variants."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from fixres_deploy.core.errors import UserInputError  # noqa: E402
from fixres_deploy.models.flops import count_flops, flops_per_image  # noqa: E402


class Tiny(torch.nn.Module):
    """conv 3->8 (3x3, bias) -> relu -> grouped conv 8->8 (3x3, stride 2, groups 4, no bias) -> relu -> GAP -> fc 8->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _export(model, path, res=16, dynamic=True, batch=1):
    torch.onnx.export(
        model.eval(),
        torch.randn(batch, 3, res, res),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}} if dynamic else None,
    )
    return str(path)


def _hand_count(k: int) -> dict:
    """FLOPs of Tiny at K x K, counted by hand (a multiply-add is 2 FLOPs)."""
    h1 = k  # conv1: stride 1, pad 1
    conv1 = 2 * 8 * h1 * h1 * 3 * 3 * 3 + 8 * h1 * h1  # + bias
    h2 = (k + 2 - 3) // 2 + 1  # conv2: stride 2, pad 1
    conv2 = 2 * 8 * h2 * h2 * (8 // 4) * 3 * 3  # groups 4: 2 input channels per output
    relu = 8 * h1 * h1 + 8 * h2 * h2
    gap = 8 * h2 * h2  # one addition per input element
    fc = 2 * 10 * 8 + 10  # + bias
    return {"conv": conv1 + conv2, "gemm": fc, "other": relu + gap, "total": conv1 + conv2 + fc + relu + gap}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    return _export(Tiny(), tmp_path_factory.mktemp("flops") / "tiny.onnx")


@pytest.mark.parametrize("k", [16, 32, 33])
def test_hand_counted_tiny_model(tiny_onnx, k):
    r = count_flops(tiny_onnx, k)
    want = _hand_count(k)
    assert r.resolution == k and r.unresolved == []
    assert r.conv_gflops * 1e9 == pytest.approx(want["conv"], abs=1e-3)
    assert r.gemm_gflops * 1e9 == pytest.approx(want["gemm"], abs=1e-3)
    assert r.other_gflops * 1e9 == pytest.approx(want["other"], abs=1e-3)
    assert r.total_gflops * 1e9 == pytest.approx(want["total"], abs=1e-3)
    assert r.per_op_type["Conv"]["nodes"] == 2 and r.per_op_type["Flatten"]["gflops"] == 0.0
    assert r.per_op_type["Flatten"]["kind"] == "free"


def test_fixed_graph_uses_its_own_resolution_and_batch(tmp_path):
    torch.manual_seed(0)
    path = _export(Tiny(), tmp_path / "fixed_b4.onnx", res=24, dynamic=False, batch=4)
    r = count_flops(path)  # no resolution: the graph's own 24, per image although the graph has batch 4
    assert r.resolution == 24 and r.batch == 4
    assert r.total_gflops * 1e9 == pytest.approx(_hand_count(24)["total"], abs=1e-3)
    assert r.to_dict() == type(r).from_dict(r.to_dict()).to_dict()


def test_dynamic_graph_needs_a_resolution(tiny_onnx, tmp_path):
    with pytest.raises(UserInputError, match="resolution"):
        count_flops(tiny_onnx)
    with pytest.raises(UserInputError, match="does not exist"):
        count_flops(str(tmp_path / "missing.onnx"), 16)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserInputError, match="not a readable ONNX"):
        count_flops(str(bad), 16)


def test_model_proto_not_modified_and_cache(tiny_onnx):
    m = onnx.load(tiny_onnx)
    before = m.SerializeToString()
    count_flops(m, 20)
    assert m.SerializeToString() == before
    a = flops_per_image(tiny_onnx, 20)
    assert flops_per_image(tiny_onnx, 20) is a  # cached per process
    assert a.total_gflops == count_flops(tiny_onnx, 20).total_gflops


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return _export(torchvision.models.resnet18(), tmp_path_factory.mktemp("r18") / "r18.onnx", res=64)


def test_resnet18_known_flops_and_quadratic_scaling(resnet18_onnx):
    r224 = count_flops(resnet18_onnx, 224)
    # torchvision's published figure: 1.814 GMACs = 3.63 GFLOPs at 224 (conv + fc).
    assert r224.conv_gflops + r224.gemm_gflops == pytest.approx(3.628, rel=0.01)
    assert r224.total_gflops == pytest.approx(3.64, rel=0.02)
    assert 0 < r224.other_gflops < 0.01 * r224.total_gflops
    assert r224.per_op_type["Conv"]["nodes"] == 20  # BN folded into the convs by the exporter
    r448 = count_flops(resnet18_onnx, 448)
    r128, r256 = count_flops(resnet18_onnx, 128), count_flops(resnet18_onnx, 256)
    # The conv work is exactly quadratic in K when the stride 32 divides K; the fc is constant.
    assert r448.conv_gflops / r224.conv_gflops == pytest.approx(4.0, rel=1e-3)
    assert r448.total_gflops / r224.total_gflops == pytest.approx(4.0, rel=0.01)
    assert r256.total_gflops / r128.total_gflops == pytest.approx(4.0, rel=0.01)
    assert r224.total_gflops / r128.total_gflops == pytest.approx((224 / 128) ** 2, rel=0.01)


def test_fp16_graph_counts_the_same(tiny_onnx, tmp_path):
    float16 = pytest.importorskip("onnxruntime.transformers.float16")
    m16 = float16.convert_float_to_float16(onnx.load(tiny_onnx), keep_io_types=True)
    assert any(n.op_type == "Cast" for n in m16.graph.node)
    a, b = count_flops(tiny_onnx, 32), count_flops(m16, 32)
    assert b.unresolved == []
    got, want = (b.conv_gflops, b.gemm_gflops, b.other_gflops), (a.conv_gflops, a.gemm_gflops, a.other_gflops)
    assert got == pytest.approx(want, rel=1e-12)
    assert b.per_op_type["Cast"]["gflops"] == 0.0


class _Reader:
    def __init__(self, res, n=4):
        rng = np.random.default_rng(0)
        self.items = iter([{"input": rng.standard_normal((1, 3, res, res)).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self.items, None)


@pytest.mark.parametrize("flavor", ["qdq_s8", "qdq_u8", "qoperator"])
def test_int8_graphs_count_the_same_work(tmp_path, flavor):
    q = pytest.importorskip("onnxruntime.quantization")
    torch.manual_seed(0)
    src = _export(Tiny(), tmp_path / "tiny16.onnx", res=16, dynamic=False)
    dst = str(tmp_path / f"tiny16_{flavor}.onnx")
    kw = dict(per_channel=True, quant_format=q.QuantFormat.QOperator if flavor == "qoperator" else q.QuantFormat.QDQ)
    if flavor == "qdq_s8":
        kw.update(
            activation_type=q.QuantType.QInt8,
            weight_type=q.QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
    q.quantize_static(src, dst, _Reader(16), **kw)
    ops = {n.op_type for n in onnx.load(dst).graph.node}
    a, b = count_flops(src), count_flops(dst)
    assert b.resolution == 16
    if flavor == "qoperator":
        assert "QLinearConv" in ops
        assert b.conv_gflops == pytest.approx(a.conv_gflops, rel=1e-12)
    else:
        assert "DequantizeLinear" in ops and "Conv" in ops
        assert b.unresolved == []
        assert b.conv_gflops == pytest.approx(a.conv_gflops, rel=1e-12)
        assert b.gemm_gflops == pytest.approx(a.gemm_gflops, rel=1e-12)
        # ORT's QDQ quantizer may drop the Relu after a quantized Conv: "other" can only shrink.
        assert b.other_gflops <= a.other_gflops + 1e-15
        assert b.total_gflops == pytest.approx(a.total_gflops, rel=0.02)
        assert b.per_op_type["DequantizeLinear"]["gflops"] == 0.0
