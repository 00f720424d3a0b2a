"""``tokenreduce train``: fine-tune a timm ViT, a ``tr.patch``-ed one, or an STViT model on an ImageFolder tree;
or a torchvision Video Swin (``swin3d_t``/``_s``/``_b``), plain or STViT, on a folder of clips (``--clips``).

    tokenreduce train --model deit_small_patch16_224 --stvit --data train/ --epochs 10 --out runs/stvit
    torchrun --nproc_per_node 8 -m tokenreduce.cli train --model deit_small_patch16_224 --stvit ...
    tokenreduce train --model swin3d_t --stvit --clips --data clips/ --epochs 10 --out runs/stvit-video
"""

from __future__ import annotations

import argparse
import ast
import os
from pathlib import Path

from ..core.errors import InputError
from . import _paths
from ._common import parse_pairs

NAME = "train"
HELP = "fine-tune a model (plain, patched with a method, or STViT) on an ImageFolder tree"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="a tokenreduce.load spec: a timm model name (created with pretrained=False), hf:DIR (an "
                            "image classifier), or video:swin3d_t (_s, _b; with --clips)")
    model.add_argument("--checkpoint", help="initial weights, .safetensors or .pth: the timm model's state dict, "
                                            "or a state dict of the built model (e.g. an STViT checkpoint)")
    model.add_argument("--img-size", type=int, default=None, help="image size passed to timm.create_model")
    model.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="another timm.create_model keyword, repeatable (e.g. --model-arg depth=6)")
    model.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                       help="the same as a comma list, as the other commands take it (e.g. depth=6,img_size=224)")
    model.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    model.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (timm drop_path_rate)")
    model.add_argument("--stvit", action="store_true", help="turn the model into STViT (tokenreduce.stvit.build)")
    model.add_argument("--num-semantic", type=int, default=16)
    model.add_argument("--tokens-per-window", type=int, default=9, help="STViT on Video Swin: per frame window")
    model.add_argument("--full-blocks", type=int, default=4)
    model.add_argument("--generation-layers", type=int, default=2)
    model.add_argument("--pooling", default="learned", choices=("avg", "max", "learned"))
    model.add_argument("--no-global-centres", action="store_true")
    model.add_argument("--method", default=None, help="patch a token-reduction method instead (tr.patch)")
    model.add_argument("--option", "--opt", dest="option", action="append", default=[], metavar="KEY=VALUE",
                       help="a method option, repeatable (e.g. --opt r=13)")

    run = parser.add_argument_group("training")
    run.add_argument("--data", required=True, help="ImageFolder training tree")
    run.add_argument("--val-data", default=None, help="ImageFolder tree evaluated after training")
    run.add_argument("--clips", action="store_true", help="--data/--val-data are clip folders (class folders of "
                     ".pt clips C x T x H x W, normalised); for --model swin3d_t/swin3d_s/swin3d_b")
    run.add_argument("--val-per-class", type=int, default=None, help="first n images of each class (sorted)")
    run.add_argument("--out", required=True, help="output directory (results.json, checkpoint)")
    run.add_argument("--checkpoint-dir", default=None, help="where last.pth goes (default: --out)")
    run.add_argument("--resume", default=None, metavar="PATH", help="a last.pth written by an earlier run")
    run.add_argument("--epochs", type=int, default=10)
    run.add_argument("--batch-size", type=int, default=64, help="per process")
    run.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: 5e-4 x global batch / 512, the paper's rule)")
    run.add_argument("--head-lr-scale", type=float, default=1.0,
                     help="multiply the head's learning rate (a CLS head re-used by STViT must move further)")
    run.add_argument("--min-lr", type=float, default=1e-6)
    run.add_argument("--weight-decay", type=float, default=0.05)
    run.add_argument("--warmup-epochs", type=float, default=1.0)
    run.add_argument("--label-smoothing", type=float, default=0.1)
    run.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (paper: 0.8)")
    run.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (paper: 1.0)")
    run.add_argument("--randaug", default=None, help="timm RandAugment string (paper: rand-m9-mstd0.5-inc1)")
    run.add_argument("--freeze-blocks", type=int, default=0, help="freeze the embedding and the first n blocks")
    run.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights (e.g. 0.9998)")
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    run.add_argument("--transform", default="model",
                     help="'model': timm's data config; 'resize<N>' (e.g. resize224): resize to N x N bicubic, "
                          "ImageNet mean/std")
    run.add_argument("--hflip", type=float, default=0.5, help="random horizontal flip probability in training")
    run.add_argument("--subset", type=int, default=None, help="train on a fixed random subset of n images")
    run.add_argument("--workers", type=int, default=4)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--grad-clip", type=float, default=None)
    run.add_argument("--max-steps", type=int, default=None, help="stop after n optimizer steps in total")
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    run.add_argument("--no-progress", action="store_true")
    _paths.add_data_root_argument(run)


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"--option {text!r} is not KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _gmacs(model) -> float:
    """GMACs per input for the start-up line: the analytic count (a plain Video Swin at 32 frames x 224 px)."""
    import tokenreduce as tr
    from tokenreduce.stvit.video_swin import is_video_swin, video_swin_flops

    return video_swin_flops(model).total_gmacs if is_video_swin(model) else tr.flops(model).total_gmacs


def load_model(args: argparse.Namespace):
    """The model ``args`` describe, with the initial weights loaded, and its preprocessing (``tokenreduce.load``
    of ``--model``): plain, patched with ``--method``, or built as STViT with ``--stvit``."""
    import tokenreduce as tr
    from tokenreduce import stvit
    from tokenreduce.adapters import num_classes as classes_of
    from tokenreduce.measure.checkpoint import load_checkpoint, read_state_dict

    if args.stvit and args.method:
        raise InputError("--stvit and --method exclude each other")
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = sum(1 for p in Path(args.data).iterdir() if p.is_dir()) if Path(args.data).is_dir() else None
    kwargs = {**dict(_option(o) for o in args.model_arg), **parse_pairs(args.model_kwargs, "--model-kwargs")}
    pretrained = bool(kwargs.pop("pretrained", False))
    if num_classes:
        kwargs["num_classes"] = num_classes
    if args.img_size:
        kwargs["img_size"] = args.img_size
    if args.drop_path is not None:
        kwargs["drop_path_rate"] = args.drop_path
    # weights of the host model are loaded with it; weights of a built STViT model after building
    built_weights = bool(args.stvit and args.checkpoint
                         and any(k.startswith(("generation.", "vit.")) for k in read_state_dict(args.checkpoint)))
    try:
        model, prep = tr.load(args.model, checkpoint=None if built_weights else args.checkpoint,
                              pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        raise InputError(f"--model {args.model!r}: {err}") from err
    video = prep.frames is not None
    if video and not args.clips:
        raise InputError(f"--model {args.model!r} is a video model: train it on clips (--clips)")
    if args.clips and not video:
        raise InputError(f"--clips trains a video model (e.g. --model video:swin3d_t), not {args.model!r}")
    if not classes_of(model):
        raise InputError(f"--model {args.model!r} has no classifier to train (its output is an embedding)")
    if args.freeze_blocks and not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        raise InputError(f"--model {args.model!r}: --freeze-blocks reads a timm model's layout (.blocks, "
                         f".patch_embed); this {type(model).__name__} has none")
    if args.stvit:
        options = ({"tokens_per_window": args.tokens_per_window} if video else
                   {"num_semantic": args.num_semantic, "generation_layers": args.generation_layers})
        model = stvit.build(model, full_blocks=args.full_blocks, pooling=args.pooling,
                            global_centres=not args.no_global_centres, **options)
        if built_weights:
            load_checkpoint(model, args.checkpoint)
    elif args.method:
        tr.patch(model, args.method, **dict(_option(o) for o in args.option))
    return model, prep


def build_model(args: argparse.Namespace):
    """The model ``args`` describe, with the initial weights loaded (:func:`load_model` without the
    preprocessing)."""
    return load_model(args)[0]


def run(args: argparse.Namespace) -> int:
    import torch

    from tokenreduce.train import TrainConfig, lr_for_batch, train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _paths.resolve_data_paths(args, "data", "val_data", "checkpoint")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model, prep = load_model(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lr = args.lr if args.lr is not None else lr_for_batch(5e-4, args.batch_size * world)
    config = TrainConfig(
        data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        mixup=args.mixup, cutmix=args.cutmix, randaug=args.randaug, freeze_blocks=args.freeze_blocks,
        ema_decay=args.ema_decay, bf16=args.bf16, transform=args.transform, hflip=args.hflip, subset=args.subset,
        num_workers=args.workers, seed=args.seed, max_steps=args.max_steps, checkpoint_dir=args.checkpoint_dir,
        resume=args.resume, val_data=args.val_data, val_per_class=args.val_per_class, grad_clip=args.grad_clip,
        head_lr_scale=args.head_lr_scale, clips=args.clips,
        progress=not args.no_progress, extra={"model": args.model, "stvit": args.stvit, "method": args.method},
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.model}{' (STViT)' if args.stvit else ''}: {_gmacs(model):.4g} GMACs/"
              f"{'clip' if args.clips else 'image'}, "
              f"lr {lr:.3g}, {args.epochs} epochs", flush=True)
    result = train(model, config, data_config=prep.data_config())
    if int(os.environ.get("RANK", "0")) == 0:
        val = result.get("val")
        print(f"done: {result['steps']} steps, {result['images_seen']} images, {result['wall_seconds']:.0f} s"
              + (f", val top-1 {val['top1']:.2f}%" if val else "") + f"; results in {Path(args.out) / 'results.json'}")
    return 0
