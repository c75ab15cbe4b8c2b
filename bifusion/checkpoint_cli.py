"""``bifusion-checkpoint``: make, import and inspect BiFusion checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

from . import importers
from .checkpoint import load_checkpoint, load_into, save_checkpoint
from .config import ModelConfig
from .demo import DEMO_SEED, demo_model
from .errors import CheckpointError
from .model import BiFusionModel


def _config_from_args(args: argparse.Namespace, **overrides) -> ModelConfig:
    base = ModelConfig.from_json(Path(args.config).read_text()) if args.config else ModelConfig()
    clip = base.clip
    if getattr(args, "clip_act", None):
        clip = dataclasses.replace(clip, quick_gelu=args.clip_act == "quick_gelu")
    changes = {"clip": clip, **overrides}
    if args.voxel_mode:
        changes["voxel_mode"] = args.voxel_mode
    return dataclasses.replace(base, **changes)


def cmd_init(args: argparse.Namespace) -> dict:
    # Fusion heads and gate stay random whatever is imported, so the result is a demo.
    config = _config_from_args(args, demo_weights=True)
    model = demo_model(config, seed=args.seed)
    if args.clip_weights:
        visual = importers.open_clip_visual(args.clip_weights, config.clip.layers)
        load_into(model.clip.visual, visual, source=str(args.clip_weights))
    if args.unet_weights:
        unet = importers.oneformer3d_backbone(args.unet_weights, args.unet_prefix)
        load_into(model.unet, unet, source=str(args.unet_weights))
    sha = save_checkpoint(args.output, config, model.state_dict())
    return {"output": str(args.output), "sha256": sha, "demo_weights": True}


def cmd_import(args: argparse.Namespace) -> dict:
    config = _config_from_args(args, demo_weights=False)
    state = importers.read_state_dict(args.input)
    if args.prefix:
        state = importers.strip_prefix(state, args.prefix)
    model = BiFusionModel(config)
    load_into(model, state, source=str(args.input))
    sha = save_checkpoint(args.output, config, model.state_dict())
    return {"output": str(args.output), "sha256": sha, "demo_weights": False}


def cmd_inspect(args: argparse.Namespace) -> dict:
    ckpt = load_checkpoint(args.checkpoint)
    params = Counter()  # parameters and buffers (BN statistics)
    for key, tensor in ckpt.state_dict.items():
        params[key.split(".", 1)[0]] += tensor.numel()
    return {
        "path": str(ckpt.path),
        "sha256": ckpt.sha256,
        "demo_weights": ckpt.config.demo_weights,
        "elements_by_module": dict(sorted(params.items())),
        "elements_total": sum(params.values()),
        "tensors": len(ckpt.state_dict),
        "config": ckpt.config.to_dict(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bifusion-checkpoint", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def arch_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="model config JSON (default: the standard architecture)")
        p.add_argument("--voxel-mode", choices=("round", "floor"), help="voxelisation of xyz / voxel_size")
        p.add_argument(
            "--clip-act",
            choices=("quick_gelu", "gelu"),
            help="activation of the CLIP tower: quick_gelu for OpenAI weights, gelu for LAION/DataComp",
        )

    p = sub.add_parser(
        "init", help="deterministic random-init demo checkpoint, optionally with imported towers"
    )
    p.add_argument("output", type=Path)
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--clip-weights", type=Path, help="open_clip ViT-B/16 weights (.safetensors/.bin/.pt)")
    p.add_argument("--unet-weights", type=Path, help="OneFormer3D/ESAM checkpoint with backbone.* keys")
    p.add_argument("--unet-prefix", default="backbone.", help="key prefix of the U-Net in --unet-weights")
    arch_options(p)
    p.set_defaults(run=cmd_init)

    p = sub.add_parser("import", help="a trained BiFusion state dict (mmengine-style) to a checkpoint")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--prefix", default="", help="key prefix to strip, e.g. 'model.' or 'encoder.'")
    arch_options(p)
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("inspect", help="config, parameter counts and hash of a checkpoint")
    p.add_argument("checkpoint", type=Path)
    p.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = args.run(args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
