"""BiFusionEncoder: frames in, per-point fused features out, every stage batched."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry as geo
from .batch import PackedBatch, pack_frames
from .checkpoint import load_checkpoint, load_into
from .config import ModelConfig
from .demo import default_checkpoint_path
from .devices import full_precision_float32, resolve_device
from .minkowski import check_cpu_determinism
from .model import BiFusionModel
from .staging import HostStaging
from .threads import configure_threads, hold_on_this_thread
from .types import EncodeOptions, Frame, FrameResult, FrameStats, Limits
from .validation import validate_frame

log = logging.getLogger("bifusion")

CPU_FUSION_CHUNK = 4096
DEMO_WARNING = (
    "BiFusion is running on the random-init DEMO checkpoint: its features are NOT "
    "meaningful. Pass a trained checkpoint for real use."
)


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    checkpoint_path: str
    checkpoint_sha256: str
    device: str
    demo_weights: bool
    config: ModelConfig
    limits: Limits
    amp: bool


@dataclass
class Points:
    """All frames' points, packed and ordered by frame."""

    rgb: torch.Tensor  # P×3 in 0..255
    batch_index: torch.Tensor  # P
    point_index: torch.Tensor  # P, pixel index or client row
    counts: torch.Tensor  # B
    u: torch.Tensor  # P, float64 pixel coordinates
    v: torch.Tensor
    valid: torch.Tensor  # P bool, projection inside the image (and not occluded)
    xyz_world: torch.Tensor  # P×3 float32
    voxel: torch.Tensor  # P×3 integer voxel coordinates (as float32), from float64 world xyz


class BiFusionEncoder:
    """Loads a checkpoint once; :meth:`encode` runs a list of frames as one batch."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "auto",
        amp: bool = False,
        limits: Limits | None = None,
        threads: int | None = None,
    ):
        # Thread pools sized here, process-wide, so speed does not depend on which thread
        # builds or runs the encoder (threads: None = $BIFUSION_THREADS, else the CPU budget).
        self.thread_settings = configure_threads(threads)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            # Same input, same bits on a CPU rests on MinkowskiEngine's patched maps and convolution.
            check_cpu_determinism()
        full_precision_float32()
        self.staging = HostStaging(self.device)
        path = Path(checkpoint) if checkpoint else default_checkpoint_path()
        ckpt = load_checkpoint(path)
        self.config = ckpt.config
        self.model = BiFusionModel(self.config)
        load_into(self.model, ckpt.state_dict, source=str(path))
        self.model.eval().to(self.device)
        self.amp = amp and self.device.type == "cuda"
        # Points per block in the fusion stage: cache-sized on a CPU, all at once on a GPU.
        self.fusion_chunk = CPU_FUSION_CHUNK if self.device.type == "cpu" else None
        # Frames per U-Net and fusion call (None: the whole batch). CLIP and the per-point
        # geometry always take the whole batch; the 3D branch and the fusion may run on
        # groups of frames when that measures faster (a server's batch policy sets it).
        self.group_3d: int | None = None
        self.limits = limits or Limits()
        self.info = ModelInfo(
            architecture=(
                f"BiFusion(CLIP {self.config.clip.model_name} @ block {self.config.clip.layers}"
                " + Res16UNet34C, LiteFusionGate)"
            ),
            checkpoint_path=str(path),
            checkpoint_sha256=ckpt.sha256,
            device=str(self.device),
            demo_weights=self.config.demo_weights,
            config=self.config,
            limits=self.limits,
            amp=self.amp,
        )
        if self.config.demo_weights:
            log.warning(DEMO_WARNING)

    def validate(self, frame: Frame, options: EncodeOptions | None = None) -> None:
        """Raise :class:`InputError` naming the field if the frame cannot be encoded."""
        validate_frame(frame, options or EncodeOptions(), self.config, self.limits)

    @torch.inference_mode()
    def encode(
        self,
        frames: Sequence[Frame],
        options: Sequence[EncodeOptions] | EncodeOptions | None = None,
        validate: bool = True,
    ) -> list[FrameResult]:
        if not frames:
            return []
        hold_on_this_thread(self.thread_settings)  # this thread may predate the settings
        if options is None or isinstance(options, EncodeOptions):
            options = [options or EncodeOptions()] * len(frames)
        if len(options) != len(frames):
            raise ValueError("options must be one per frame")
        if validate:
            for frame, opts in zip(frames, options, strict=True):
                self.validate(frame, opts)

        timer = _StageTimer(self.device)
        with timer("prepare"):
            batch = pack_frames(frames, options, self.config, self.staging)
        with timer("points"):
            points = self._points(batch)
        with timer("clip"), self._autocast():
            maps = self.model.clip(self._clip_images(batch)).float()
        groups = self._frame_groups(points.counts)
        if len(groups) > 1:
            features = maps.new_empty(len(points.valid), self.config.feature_dim)
            alpha = maps.new_empty(len(points.valid))
        for first, last, rows in groups:
            # A group looks to the model like a batch of its own (batch index from 0).
            batch_index = points.batch_index[rows] - first
            with timer("unet"):
                point_3d = self.model.features_3d(points.voxel[rows], points.rgb[rows], batch_index)
            with timer("fusion"), self._autocast():
                frame_of_point = points.batch_index[rows]
                gx, gy = geo.pixel_to_grid(
                    points.u[rows],
                    points.v[rows],
                    batch.widths[frame_of_point],
                    batch.heights[frame_of_point],
                )
                fused, weight = self.model.fuse(
                    maps[first:last],
                    (gx.float(), gy.float()),
                    point_3d,
                    points.valid[rows],
                    batch_index,
                    last - first,
                    chunk=self.fusion_chunk,
                )
                if len(groups) == 1:
                    features, alpha = fused, weight
                else:
                    features[rows], alpha[rows] = fused, weight
        with timer("output"):
            results = self._results(frames, options, points, features.float(), alpha.float())
        for result in results:
            result.timings_ms = timer.ms
        return results

    # Stage 1, 2 and 5's geometry: points, their camera/world coordinates and projection.
    # Whatever picks something discrete (depth range, voxel, pixel, bounds, occlusion) is
    # elementwise per point from its own frame's data, in float64 past the depth image
    # (see geometry.py): a frame's points, voxels and mask do not depend on its batch-mates.
    def _points(self, batch: PackedBatch) -> Points:
        cfg = self.config
        pixel_counts = batch.widths * batch.heights
        pixel_frame = geo.segment_ids(pixel_counts)
        from_depth = batch.has_depth & ~batch.uses_client_points
        usable = (batch.depth >= cfg.min_depth) & (batch.depth <= cfg.max_depth) & from_depth[pixel_frame]
        candidates = torch.nonzero(usable).squeeze(1)
        counts = torch.bincount(pixel_frame[candidates], minlength=batch.num_frames)
        pixels = candidates[geo.uniform_subsample(counts, batch.max_points)]
        depth_frame = pixel_frame[pixels]
        local = pixels - batch.pixel_offsets[depth_frame]
        width = batch.widths[depth_frame]
        depth_xyz = geo.backproject(
            (local % width).double(),
            torch.div(local, width, rounding_mode="floor").double(),
            batch.depth[pixels].double(),
            batch.intrinsics[depth_frame],
        )

        client_frame = geo.segment_ids(batch.client_counts)
        client_index = (
            torch.arange(len(client_frame), device=batch.device)
            - geo.segment_offsets(batch.client_counts)[client_frame]
        )

        # Frame by frame, depth points then client points (a frame has one or the
        # other): scatter each to its slot instead of sorting.
        kept = torch.minimum(counts, batch.max_points)
        per_frame = kept + batch.client_counts
        starts = geo.segment_offsets(per_frame)
        depth_rank = torch.arange(len(pixels), device=batch.device) - geo.segment_offsets(kept)[depth_frame]
        slot = torch.cat((starts[depth_frame] + depth_rank, starts[client_frame] + client_index))

        def place(*parts: torch.Tensor) -> torch.Tensor:
            joined = torch.cat(parts)
            out = torch.empty_like(joined)
            out[slot] = joined
            return out

        batch_index = place(depth_frame, client_frame)
        xyz = place(depth_xyz, batch.client_points[:, :3].double())
        point_index = place(local, client_index)
        rgb = place(torch.full_like(depth_xyz, float("nan"), dtype=torch.float32), batch.client_points[:, 3:])

        width, height = batch.widths[batch_index], batch.heights[batch_index]
        u, v = geo.project(xyz, batch.intrinsics[batch_index])
        valid = geo.inside_image(u, v, xyz[:, 2], width, height)
        pixel = batch.pixel_offsets[batch_index] + geo.nearest_pixel(u, v, width, height)

        # Occlusion test for client points sent with a depth image (OpenScene's rule).
        tau = batch.occlusion_tau[batch_index].double()
        tested = batch.uses_client_points[batch_index] & batch.has_depth[batch_index] & (tau > 0)
        surface = batch.depth[pixel].double()
        visible = (surface - xyz[:, 2]).abs() <= tau * xyz[:, 2]
        valid = valid & (~tested | visible)

        # Colour: the client's, else the pixel the point projects onto, else the mean
        # colour (which the 3D branch normalises to zero).
        image_rgb = batch.color[pixel].float()
        mean_rgb = self.model.color_mean.expand_as(image_rgb)
        fallback = torch.where(valid.unsqueeze(1), image_rgb, mean_rgb)
        rgb = torch.where(torch.isnan(rgb), fallback, rgb)

        xyz_world = geo.transform(xyz, batch.cam_to_world[batch_index])
        return Points(
            rgb=rgb,
            batch_index=batch_index,
            point_index=point_index,
            counts=per_frame,
            u=u,
            v=v,
            valid=valid,
            xyz_world=xyz_world.float(),
            voxel=geo.voxel_coordinates(xyz_world, cfg.voxel_size, cfg.voxel_mode).float(),
        )

    def _frame_groups(self, counts: torch.Tensor) -> list[tuple[int, int, slice]]:
        """(first frame, end frame, their rows of the packed points) per group of at most
        ``group_3d`` frames; one group of every frame when ``group_3d`` is None."""
        frames = len(counts)
        size = self.group_3d or frames
        if size >= frames:
            return [(0, frames, slice(None))]
        ends = torch.cumsum(counts, 0).tolist()
        starts = [0, *ends]
        return [
            (first, min(first + size, frames), slice(starts[first], ends[min(first + size, frames) - 1]))
            for first in range(0, frames, size)
        ]

    def _clip_images(self, batch: PackedBatch) -> torch.Tensor:
        """Every frame squashed to the CLIP input size, one resize per distinct frame size."""
        size = self.config.clip.image_size
        images = torch.empty(batch.num_frames, 3, size, size, device=batch.device)
        for indices, height, width in batch.size_groups:
            index = torch.tensor(indices, device=batch.device)
            offsets = batch.pixel_offsets[index].unsqueeze(1) + torch.arange(
                height * width, device=batch.device
            )
            group = batch.color[offsets].view(len(indices), height, width, 3)
            group = group.permute(0, 3, 1, 2).float()
            resized = F.interpolate(
                group, size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
            images[index] = resized.clamp_(0, 255)
        return images

    def _results(
        self,
        frames: Sequence[Frame],
        options: Sequence[EncodeOptions],
        points: Points,
        features: torch.Tensor,
        alpha: torch.Tensor,
    ) -> list[FrameResult]:
        num_frames = len(frames)
        # Stats in float64: float32 sums over 200 000 points drift by ~1e-5.
        valid_f = points.valid.double()
        valid_count = valid_f.new_zeros(num_frames).index_add_(0, points.batch_index, valid_f)
        alpha_sum = valid_f.new_zeros(num_frames).index_add_(0, points.batch_index, alpha.double() * valid_f)
        want_world = any(o.return_points_world for o in options)
        device_tensors = {
            "features": features,
            "alpha": alpha,
            "valid": points.valid,
            "point_indices": points.point_index,
            "counts": points.counts,
            "valid_count": valid_count,
            "alpha_sum": alpha_sum,
        }
        if want_world:
            device_tensors["points_world"] = points.xyz_world
        host = self.staging.download(device_tensors)
        counts = host["counts"].tolist()
        bounds = np.cumsum(counts)[:-1]

        def split(name):
            return [None] * num_frames if name not in host else np.split(host[name], bounds)

        parts = {k: split(k) for k in ("features", "alpha", "valid", "point_indices", "points_world")}
        results = []
        for i, (frame, opts) in enumerate(zip(frames, options, strict=True)):
            n, n_valid = counts[i], float(host["valid_count"][i])
            results.append(
                FrameResult(
                    frame_id=frame.frame_id,
                    features=parts["features"][i],
                    alpha=parts["alpha"][i],
                    valid=parts["valid"][i],
                    point_indices=parts["point_indices"][i],
                    points_world=parts["points_world"][i] if opts.return_points_world else None,
                    stats=FrameStats(
                        num_points=n,
                        valid_ratio=n_valid / n if n else 0.0,
                        gate_mean=float(host["alpha_sum"][i]) / n_valid if n_valid else 0.0,
                    ),
                )
            )
        return results

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()


class _StageTimer:
    """Wall time per stage in ms; waits for the GPU so each stage is charged its own work."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            # Added up: a stage may run once per group of frames.
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0
