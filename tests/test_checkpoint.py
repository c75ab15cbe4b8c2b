"""Checkpoint format, importers and the bifusion-checkpoint CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from bifusion import BiFusionEncoder, CheckpointError, EncodeOptions
from bifusion.checkpoint import load_checkpoint, save_checkpoint
from bifusion.checkpoint_cli import main as checkpoint_cli
from bifusion.config import ModelConfig
from bifusion.demo import demo_model
from bifusion.unet import Res16UNet34C


def run_cli(args, capsys):
    code = checkpoint_cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


@pytest.mark.parametrize(
    ("model_name", "quick_gelu", "suffix"),
    [
        ("ViT-B-16-quickgelu", True, ".safetensors"),
        ("ViT-B-16", False, ".bin"),
    ],
)
def test_2d_tower_matches_open_clip_forward_intermediates(tmp_path, capsys, model_name, quick_gelu, suffix):
    torch.manual_seed(123)
    reference = open_clip.create_model(model_name, pretrained=None).eval()
    weights = tmp_path / f"open_clip{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(weights))
    else:
        torch.save(state, weights)
    out = tmp_path / "ckpt.safetensors"
    act = "quick_gelu" if quick_gelu else "gelu"
    code, report = run_cli(["init", out, "--clip-weights", weights, "--clip-act", act], capsys)
    assert code == 0 and report["demo_weights"] is True

    tower = BiFusionEncoder(out, device="cpu").model.clip
    images = torch.rand(2, 3, 224, 224) * 255
    with torch.inference_mode():
        ours = tower.tokens(tower.normalize(images))
        x = (images / 255 - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            open_clip.OPENAI_DATASET_STD
        ).view(1, 3, 1, 1)
        expected = reference.visual.forward_intermediates(x, indices=[5], intermediates_only=True)
        expected = expected["image_intermediates"][0]
    assert ours.shape == (2, 768, 14, 14)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert len(tower.visual.transformer.resblocks) == 6
    maps = tower(images)
    assert maps.shape == (2, 256, 30, 40)


def test_patchwise_convolution_is_the_convolution_it_replaces():
    """The patch embedding and the 1×1 projection run as one matmul over patches (the same
    bits at any thread count on a CPU): the same parameters and state dict, the same result
    to float32 rounding, a partial patch at the edge dropped as the convolution drops it."""
    from torch import nn

    from bifusion.clip_tower import PatchwiseConv2d

    torch.manual_seed(5)
    for conv, shape in (
        (nn.Conv2d(3, 64, 16, stride=16, bias=False), (2, 3, 70, 50)),
        (nn.Conv2d(96, 32, 1), (3, 96, 7, 9)),
    ):
        patchwise = PatchwiseConv2d.like(conv)
        assert patchwise.state_dict().keys() == conv.state_dict().keys()
        x = torch.randn(shape)
        with torch.inference_mode():
            expected, got = conv(x), patchwise(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for other in (
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(3, 8, 2, stride=2, padding=1),
        nn.Conv2d(4, 8, 2, stride=2, groups=2),
    ):
        with pytest.raises(ValueError, match="not a patchwise convolution"):
            PatchwiseConv2d.like(other)


def oneformer3d_backbone_shapes() -> dict[str, tuple[int, ...]]:
    """Key → shape of OneFormer3D's Res16UNet34C (in_channels=3, out_channels=96,
    conv1_kernel_size=5), written out from its mink_unet.py naming, independently of
    bifusion.unet. MinkowskiEngine stores a k³ kernel as (k³, in, out) and a 1×1 one as (in, out)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name, c):
        shapes.update(
            {
                f"{name}.bn.weight": (c,),
                f"{name}.bn.bias": (c,),
                f"{name}.bn.running_mean": (c,),
                f"{name}.bn.running_var": (c,),
                f"{name}.bn.num_batches_tracked": (),
            }
        )

    def layer(name, inplanes, planes, blocks):
        for i in range(blocks):
            cin = inplanes if i == 0 else planes
            shapes[f"{name}.{i}.conv1.kernel"] = (27, cin, planes)
            bn(f"{name}.{i}.norm1", planes)
            shapes[f"{name}.{i}.conv2.kernel"] = (27, planes, planes)
            bn(f"{name}.{i}.norm2", planes)
            if i == 0 and cin != planes:
                shapes[f"{name}.0.downsample.0.kernel"] = (cin, planes)
                bn(f"{name}.0.downsample.1", planes)

    planes, layers = (32, 64, 128, 256, 256, 128, 96, 96), (2, 3, 4, 6, 2, 2, 2, 2)
    shapes["conv0p1s1.kernel"] = (125, 3, 32)
    bn("bn0", 32)
    inplanes = 32
    for i, name in enumerate(("conv1p1s2", "conv2p2s2", "conv3p4s2", "conv4p8s2")):
        shapes[f"{name}.kernel"] = (8, inplanes, inplanes)
        bn(f"bn{i + 1}", inplanes)
        layer(f"block{i + 1}", inplanes, planes[i], layers[i])
        inplanes = planes[i]
    skips = (128, 64, 32, 32)
    for i, name in enumerate(("convtr4p16s2", "convtr5p8s2", "convtr6p4s2", "convtr7p2s2")):
        shapes[f"{name}.kernel"] = (8, inplanes, planes[4 + i])
        bn(f"bntr{4 + i}", planes[4 + i])
        layer(f"block{5 + i}", planes[4 + i] + skips[i], planes[4 + i], layers[4 + i])
        inplanes = planes[4 + i]
    return shapes


def test_unet_has_exactly_the_oneformer3d_backbone_layout():
    ours = {k: tuple(v.shape) for k, v in Res16UNet34C(ModelConfig().unet).state_dict().items()}
    assert ours == oneformer3d_backbone_shapes()


def fake_oneformer3d_checkpoint(path, seed=7):
    gen = torch.Generator().manual_seed(seed)
    backbone = {
        f"backbone.{k}": (torch.randn(s, generator=gen) if s else torch.tensor(5))
        for k, s in oneformer3d_backbone_shapes().items()
    }
    backbone["backbone.final.kernel"] = torch.randn(96, 20, generator=gen)
    backbone["backbone.final.bias"] = torch.randn(20, generator=gen)
    others = {"decoder.query.weight": torch.randn(4, 4, generator=gen), "unet.x": torch.zeros(1)}
    torch.save({"state_dict": {**backbone, **others}, "meta": {"epoch": 12, "iter": 3000}}, path)
    return backbone


def test_oneformer3d_backbone_imports_into_the_unet(tmp_path, capsys, tum_frames):
    source = tmp_path / "esam.pth"
    backbone = fake_oneformer3d_checkpoint(source)
    out = tmp_path / "ckpt.safetensors"
    code, _ = run_cli(["init", out, "--unet-weights", source], capsys)
    assert code == 0
    loaded = load_checkpoint(out).state_dict
    for key, value in backbone.items():
        if ".final." in key:
            continue
        torch.testing.assert_close(loaded["unet." + key.removeprefix("backbone.")], value, rtol=0, atol=0)
    assert not any(".final." in k for k in loaded)


def test_misfitting_unet_checkpoint_is_refused_with_the_keys_named(tmp_path, capsys):
    source = tmp_path / "bad.pth"
    state = {f"backbone.{k}": torch.zeros(s) for k, s in oneformer3d_backbone_shapes().items()}
    del state["backbone.block3.1.conv2.kernel"]
    state["backbone.block1.0.conv1.kernel"] = torch.zeros(27, 32, 33)
    state["backbone.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, source)
    code, err = run_cli(["init", tmp_path / "x.safetensors", "--unet-weights", source], capsys)
    assert code == 2
    assert "missing key(s): block3.1.conv2.kernel" in err
    assert "unexpected key(s): extra.weight" in err
    assert "block1.0.conv1.kernel: (27, 32, 33) != expected (27, 32, 32)" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_pickled_objects_are_refused(tmp_path, capsys):
    source = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "meta": {"cfg": ModelConfig}}, source)
    code, err = run_cli(["init", tmp_path / "x.safetensors", "--unet-weights", source], capsys)
    assert code == 2 and "weights_only" in err


def test_import_mmengine_state_dict_with_prefix(tmp_path, capsys, tum_frames):
    trained = demo_model(seed=5)
    source = tmp_path / "trained.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}, "meta": {}}, source)
    out = tmp_path / "trained.safetensors"
    code, report = run_cli(["import", source, out, "--prefix", "model."], capsys)
    assert code == 0 and report["demo_weights"] is False
    encoder = BiFusionEncoder(out, device="cpu")
    assert encoder.info.demo_weights is False and encoder.info.checkpoint_sha256 == report["sha256"]
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(encoder.model.state_dict()[key], value, rtol=0, atol=0)
    code, err = run_cli(["import", source, tmp_path / "y.safetensors", "--prefix", "encoder."], capsys)
    assert code == 2 and "no key starts with 'encoder.'" in err


def test_demo_checkpoint_is_deterministic(tmp_path, encoder, tum_frames):
    again = demo_model()
    for key, value in again.state_dict().items():
        torch.testing.assert_close(encoder.model.state_dict()[key], value, rtol=0, atol=0)
    a = save_checkpoint(tmp_path / "a.safetensors", again.config, again.state_dict())
    b = save_checkpoint(tmp_path / "b.safetensors", again.config, again.state_dict())
    assert a == b == encoder.info.checkpoint_sha256
    assert encoder.info.demo_weights is True


def test_inspect_reports_config_counts_and_hash(tmp_path, capsys, encoder):
    code, report = run_cli(["inspect", encoder.info.checkpoint_path], capsys)
    assert code == 0
    assert report["sha256"] == encoder.info.checkpoint_sha256
    assert report["config"]["voxel_mode"] == "round" and report["config"]["clip"]["layers"] == 6
    assert report["elements_by_module"]["unet"] > 37_000_000
    assert report["demo_weights"] is True


def test_foreign_or_damaged_files_are_rejected(tmp_path, encoder):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a BiFusion checkpoint"):
        load_checkpoint(foreign)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(Path(encoder.info.checkpoint_path).read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        BiFusionEncoder(damaged, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        BiFusionEncoder(tmp_path / "missing.safetensors", device="cpu")


def test_checkpoint_round_trip_gives_identical_features(tmp_path, encoder, tum_frames):
    copy = tmp_path / "copy.safetensors"
    save_checkpoint(copy, encoder.config, encoder.model.state_dict())
    other = BiFusionEncoder(copy, device="cpu")
    options = EncodeOptions(max_points=2000)
    a, b = encoder.encode(tum_frames[:1], options)[0], other.encode(tum_frames[:1], options)[0]
    np.testing.assert_array_equal(a.features, b.features)
