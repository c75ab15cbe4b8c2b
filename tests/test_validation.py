"""Every input check raises InputError naming its field, before any compute."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bifusion import EncodeOptions, InputError, Intrinsics, Limits


def with_pose(matrix):
    return lambda f: dataclasses.replace(f, cam_to_world=matrix(f.cam_to_world.copy()))


def scaled_rotation(m):
    m[:3, :3] *= 1.1
    return m


def reflected(m):
    m[:3, 0] *= -1
    return m


def sheared(m):
    m[0, 1] += 0.05
    return m


def nan_entry(m):
    m[1, 3] = np.nan
    return m


def bad_last_row(m):
    m[3, 0] = 0.5
    return m


def far_translation(m, distance=1e300):
    m[0, 3] = distance
    return m


def points(array):
    return lambda f: dataclasses.replace(f, points=array)


CASES = {
    "color float dtype": ("color", lambda f: dataclasses.replace(f, color=f.color.astype(np.float32))),
    "color grey": ("color", lambda f: dataclasses.replace(f, color=f.color[..., 0])),
    "color RGBA": ("color", lambda f: dataclasses.replace(f, color=np.zeros((480, 640, 4), np.uint8))),
    "color tiny": ("color", lambda f: dataclasses.replace(f, color=f.color[:8, :8], depth=f.depth[:8, :8])),
    "color not an array": ("color", lambda f: dataclasses.replace(f, color=f.color.tolist())),
    "depth size mismatch": ("depth", lambda f: dataclasses.replace(f, depth=f.depth[:240, :320])),
    "depth int32": ("depth", lambda f: dataclasses.replace(f, depth=f.depth.astype(np.int32))),
    "depth missing": ("depth", lambda f: dataclasses.replace(f, depth=None)),
    "depth_scale zero": ("depth_scale", lambda f: dataclasses.replace(f, depth_scale=0.0)),
    "depth_scale NaN": ("depth_scale", lambda f: dataclasses.replace(f, depth_scale=float("nan"))),
    "fx NaN": (
        "intrinsics.fx",
        lambda f: dataclasses.replace(f, intrinsics=Intrinsics(np.nan, 525, 319.5, 239.5)),
    ),
    "fy zero": (
        "intrinsics.fy",
        lambda f: dataclasses.replace(f, intrinsics=Intrinsics(525, 0.0, 319.5, 239.5)),
    ),
    "cx inf": (
        "intrinsics.cx",
        lambda f: dataclasses.replace(f, intrinsics=Intrinsics(525, 525, np.inf, 239.5)),
    ),
    "fx tiny: back-projection beyond the coordinate bound": (
        "intrinsics.fx",
        lambda f: dataclasses.replace(f, intrinsics=Intrinsics(1e-9, 525, 319.5, 239.5)),
    ),
    "cy huge: back-projection beyond the coordinate bound": (
        "intrinsics.fy",
        lambda f: dataclasses.replace(f, intrinsics=Intrinsics(525, 525, 319.5, 1e300)),
    ),
    "cy negative": (
        "intrinsics.cy",
        lambda f: dataclasses.replace(f, intrinsics=Intrinsics(525, 525, 319.5, -1)),
    ),
    "pose NaN": ("cam_to_world", with_pose(nan_entry)),
    "pose scaled": ("cam_to_world", with_pose(scaled_rotation)),
    "pose reflected": ("cam_to_world", with_pose(reflected)),
    "pose sheared": ("cam_to_world", with_pose(sheared)),
    "pose last row": ("cam_to_world", with_pose(bad_last_row)),
    "pose translation 1e300 (inf as float32)": ("cam_to_world", with_pose(far_translation)),
    "pose translation beyond the coordinate bound": (
        "cam_to_world",
        with_pose(lambda m: far_translation(m, 1e6)),
    ),
    "pose 3x4": ("cam_to_world", lambda f: dataclasses.replace(f, cam_to_world=f.cam_to_world[:3])),
    "points N×4": ("points", points(np.zeros((10, 4), np.float32))),
    "points empty": ("points", points(np.zeros((0, 3), np.float32))),
    "points NaN": ("points", points(np.full((10, 3), np.nan, np.float32))),
    "points 1e300 (inf as float32)": ("points", points(np.full((10, 3), 1e300))),
    "points beyond the coordinate bound": ("points", points(np.full((10, 3), 1e6, np.float32))),
    "points int": ("points", points(np.ones((10, 3), np.int32))),
    "points rgb range": ("points", points(np.full((10, 6), 300.0, np.float32))),
    "points too many": ("points", points(np.ones((200_001, 3), np.float32))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_frame_names_its_field(encoder, tum_frames, case):
    field, mutate = CASES[case]
    frame = mutate(tum_frames[0])
    with pytest.raises(InputError) as info:
        encoder.encode([frame])
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (EncodeOptions(max_points=0), "options.max_points"),
        (EncodeOptions(max_points=Limits().max_points + 1), "options.max_points"),
        (EncodeOptions(occlusion_tau=-0.1), "options.occlusion_tau"),
        (EncodeOptions(occlusion_tau=float("nan")), "options.occlusion_tau"),
    ],
)
def test_bad_options_name_their_field(encoder, tum_frames, options, field):
    with pytest.raises(InputError) as info:
        encoder.encode(tum_frames[:1], options)
    assert info.value.field == field


def test_one_bad_frame_stops_the_batch_before_compute(encoder, tum_frames, monkeypatch):
    calls = []
    monkeypatch.setattr(encoder.model, "features_3d", lambda *a: calls.append(1))
    bad = dataclasses.replace(tum_frames[1], depth_scale=-1.0)
    with pytest.raises(InputError, match="depth_scale"):
        encoder.encode([tum_frames[0], bad])
    assert not calls


def test_real_poses_pass_the_rigidity_check(encoder, tum_frames):
    for frame in tum_frames:
        encoder.validate(frame)


def test_a_rotation_whose_check_overflows_is_refused(encoder, tum_frames):
    # Finite but huge entries overflow RᵀR (inf, or NaN from inf - inf): refused all the same.
    pose = np.eye(4)
    pose[:3, :3] = ((1e200, 1e200, 0), (1e200, -1e200, 0), (0, 0, 0))
    frame = dataclasses.replace(tum_frames[0], cam_to_world=pose)
    with pytest.raises(InputError, match="orthonormal"):
        encoder.validate(frame)
