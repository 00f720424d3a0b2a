"""Fine-tuning on an ImageFolder tree (or a folder of clips, ``clips=True``): one process, or many under
``torchrun`` (DistributedDataParallel).

AdamW, cosine schedule with linear warm-up (timm's ``CosineLRScheduler``, stepped per update), label
smoothing, optional Mixup/CutMix (timm ``Mixup``) and RandAugment (timm ``create_transform``), optional
freezing of the embedding and the first n blocks, optional EMA (timm ``ModelEmaV3``), bfloat16 autocast,
tqdm progress bars, an atomic checkpoint (temp file + ``os.replace``) after every epoch, resume.

Reproducibility: every epoch reseeds torch/numpy/random from ``seed``, the epoch and the rank, and the data
order comes from a ``DistributedSampler`` (one replica when not distributed) with ``set_epoch``. So a run
resumed from an epoch checkpoint ends where an uninterrupted run ends, and N processes with per-process
batch b follow one process with batch N*b (same global batches, gradients averaged by DDP).

>>> from tokenreduce.train import TrainConfig, train          # doctest: +SKIP
>>> result = train(model, TrainConfig(data="cifar10/train", out="runs/a", epochs=3, freeze_blocks=4))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms
from tqdm import tqdm

from .adapters import num_classes as classes_of
from .adapters import predictor
from .core.errors import InputError, InputTypeError
from .measure.checkpoint import load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    """Everything a run needs; saved in the checkpoint and the results JSON.

    ``batch_size`` is per process (the global batch is ``batch_size * world_size``). ``freeze_blocks``
    freezes the patch/position embedding, prefix tokens and the first n blocks. ``max_steps`` stops the run
    after that many optimizer steps in total without writing a checkpoint for the unfinished epoch (a
    stand-in for a killed job, used by the tests). ``subset`` trains on a fixed random subset of that many
    images. ``head_lr_scale`` multiplies the learning rate of the classifier head (a re-purposed head, e.g.
    an STViT head that now reads averaged semantic tokens instead of the CLS token, needs to move further).
    ``transform``: "model" (timm's data config of the model, with RandAugment when ``randaug``) or
    "resize<N>", e.g. "resize224" (the benchmark classifier's: resize to N x N bicubic, ImageNet mean/std,
    random flip when training). ``checkpoint_dir`` defaults to ``out``. ``clips``: ``data`` and ``val_data`` are
    clip folders (:func:`clip_folder`: one folder per class of ``.pt`` clips ``C x T x H x W``, already
    normalised, as torchvision's video models take them), flipped horizontally with probability ``hflip`` when
    training; for video models such as Video Swin and its STViT build.
    """

    data: str
    out: str
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    randaug: str | None = None  # e.g. "rand-m9-mstd0.5-inc1"
    freeze_blocks: int = 0
    ema_decay: float | None = None
    bf16: bool = False
    transform: str = "model"
    hflip: float = 0.5
    subset: int | None = None
    num_workers: int = 0
    seed: int = 0
    max_steps: int | None = None
    checkpoint_dir: str | None = None
    resume: str | None = None
    val_data: str | None = None
    val_per_class: int | None = None
    grad_clip: float | None = None
    head_lr_scale: float = 1.0
    clips: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- distributed


def _distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we joined the group); joins the process group when launched by
    torchrun (``measure.evaluate.dist_backend``: gloo on CPU, nccl on GPUs, each process on its LOCAL_RANK's)."""
    from .measure.evaluate import dist_backend, process_device

    device = process_device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    joined = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(dist_backend(device))
        joined = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world, device, joined


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------ data


def _data_transform(model: nn.Module, config: TrainConfig, training: bool,
                    data_config: dict[str, Any] | None = None) -> Callable:
    if config.clips:
        return _clip_flip(config.hflip if training else 0.0)
    resize = re.fullmatch(r"resize(\d+)", config.transform)
    if resize:
        size = int(resize.group(1))
        steps = [transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC)]
        if training and config.hflip > 0:
            steps.append(transforms.RandomHorizontalFlip(config.hflip))
        if training and config.randaug:
            from timm.data.auto_augment import rand_augment_transform
            steps.append(rand_augment_transform(config.randaug, {}))
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return transforms.Compose(steps)
    if config.transform != "model":
        raise InputError(f"transform={config.transform!r} is not supported (choose 'model' or 'resize<N>')")
    data_config = data_config or resolve_data_config({}, model=unwrap(_host_vit(model)))
    if not training:
        return create_transform(**data_config, is_training=False)
    return create_transform(**data_config, is_training=True, auto_augment=config.randaug, hflip=config.hflip)


def _host_vit(model: nn.Module) -> nn.Module:
    return getattr(unwrap(model), "vit", unwrap(model))


def per_class_subset(dataset: datasets.ImageFolder, per_class: int) -> Subset:
    """The first ``per_class`` images of each class, in sorted file-name order (ImageFolder sorts)."""
    taken: dict[int, int] = {}
    keep = []
    for i, (_, label) in enumerate(dataset.samples):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return Subset(dataset, keep)


def _image_folder(root: str, transform: Callable, clips: bool = False) -> datasets.DatasetFolder:
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data directory {root!r} does not exist")
    return clip_folder(root, transform) if clips else datasets.ImageFolder(root, transform=transform)


def _load_clip(path: str) -> torch.Tensor:
    clip = torch.load(path, weights_only=True)
    if not torch.is_tensor(clip) or clip.ndim != 4 or not clip.is_floating_point():
        shape = tuple(clip.shape) if torch.is_tensor(clip) else type(clip).__name__
        raise InputError(f"{path}: a clip must be a float tensor C x T x H x W, got {shape}")
    return clip


def clip_folder(root: str, transform: Callable | None = None) -> datasets.DatasetFolder:
    """A folder of clips: one sub-folder per class of ``.pt`` files, each a float tensor ``C x T x H x W``
    (``torch.save``; read with ``weights_only=True``), already normalised; labels as ``ImageFolder`` gives them."""
    return datasets.DatasetFolder(root, loader=_load_clip, extensions=(".pt",), transform=transform)


def _flip_clip(clip: torch.Tensor, probability: float) -> torch.Tensor:
    return clip.flip(-1) if probability > 0 and random.random() < probability else clip


def _clip_flip(probability: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Flip a whole clip horizontally (every frame alike) with ``probability`` (picklable for data workers)."""
    return functools.partial(_flip_clip, probability=probability)


# ----------------------------------------------------------------------------------------- weights


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict (``.safetensors``, or ``.pth``/``.pt`` through ``torch.load(weights_only=True)``,
    also a training checkpoint's ``"model"`` entry) into ``model``; a file that cannot be read or does not
    match raises ValueError naming the missing/unexpected keys (``tokenreduce.measure.checkpoint``).
    """
    load_checkpoint(unwrap(model), path)
    return model


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: str | os.PathLike) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain types and tensors only
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001
        raise InputError(f"cannot resume from {str(path)!r} (corrupt or not a checkpoint): {err}") from err
    needed = {"model", "optimizer", "scheduler", "epoch", "step"}
    if not isinstance(state, dict) or not needed <= set(state):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{str(path)!r} is not a training checkpoint (needs {sorted(needed)}, has {have})")
    return state


# -------------------------------------------------------------------------------------------- freezing


def freeze_first_blocks(model: nn.Module, count: int) -> list[str]:
    """Freeze the embedding (patch, position, prefix tokens) and the first ``count`` blocks of a timm ViT or
    an STViT model (whose full blocks come first); returns the frozen parameter names."""
    host = _host_vit(model)
    if not hasattr(host, "blocks") or not hasattr(host, "patch_embed"):
        raise InputTypeError(f"cannot freeze blocks of a {type(host).__name__}: it has no .blocks/.patch_embed")
    blocks = list(host.blocks)
    if hasattr(unwrap(model), "semantic_blocks"):
        stvit = unwrap(model)
        blocks = blocks + list(stvit.generation) + list(stvit.semantic_blocks)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(blocks):
        raise InputError(f"freeze_blocks={count!r} must be between 0 and the depth {len(blocks)}")
    if count == 0:
        return []
    frozen = [host.patch_embed, *blocks[:count]]
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    out = []
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
            out.append(names.get(id(p), "?"))
    for attr in ("cls_token", "reg_token", "pos_embed", "dist_token"):
        p = getattr(host, attr, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(False)
            out.append(names.get(id(p), attr))
    return out


# ------------------------------------------------------------------------------------------ evaluate


@torch.no_grad()
def evaluate(model: nn.Module, data: str, per_class: int | None = None, batch_size: int = 64,
             transform: Callable | str = "model", progress: bool = True, bf16: bool = False,
             clips: bool = False) -> dict:
    """Top-1 of ``model`` on an ImageFolder tree, or a clip folder with ``clips`` (optionally the first
    ``per_class`` images or clips of each class)."""
    if isinstance(transform, str):
        transform = _data_transform(model, TrainConfig(data=data, out="", transform=transform, clips=clips),
                                    training=False)
    dataset = _image_folder(data, transform, clips)
    if per_class is not None:
        dataset = per_class_subset(dataset, per_class)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    predict = predictor(unwrap(model))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = seen = 0
    predictions = []
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = predict(model, images.to(device))
        pred = logits.argmax(dim=-1).cpu()
        predictions.append(pred)
        correct += int((pred == labels).sum())
        seen += len(labels)
    model.train(was_training)
    return {"top1": 100.0 * correct / seen, "images": seen, "seconds": time.perf_counter() - start,
            "predictions": torch.cat(predictions).tolist()}


# --------------------------------------------------------------------------------------------- train


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    value = seed + 1000 * epoch + 17 * rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


@dataclass
class _Run:
    """One run's state, built by the set-up and advanced by the loop (the parts of :func:`train` share it)."""

    model: nn.Module
    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    joined: bool
    out: Path
    ckpt_dir: Path
    frozen: list[str]
    trainable: list[nn.Parameter]
    dataset: Any = None
    sampler: Any = None
    loader: Any = None
    steps_per_epoch: int = 0
    optimizer: Any = None
    scheduler: Any = None
    mixup: Any = None
    criterion: Any = None
    ema: Any = None
    net: Any = None
    start_epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    begin: float = 0.0
    stopped: bool = False
    data_config: dict[str, Any] | None = None  # transform="model": the preprocessing (default timm's of the model)
    predict: Any = None  # the family's logits of (model, images): tokenreduce.adapters.predictor

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train(model: nn.Module, config: TrainConfig, on_step: Callable[[int, float], None] | None = None,
          data_config: dict[str, Any] | None = None) -> dict:
    """Fine-tune ``model`` (an STViT model, a ``tr.patch``-ed or a plain timm model, a Hugging Face classifier) as
    ``config`` says. The logits are the family's (``tokenreduce.adapters.predictor``); ``transform="model"``
    preprocesses as ``data_config`` says (a timm data config, e.g. ``tokenreduce.load(spec).preprocessing
    .data_config()``), by default as timm's config of the model.

    Returns (and rank 0 writes to ``<out>/results.json``) the run's summary: losses per epoch, steps, images
    seen, wall time, validation top-1 when ``val_data`` is given. ``on_step(step, loss)`` is called on every
    rank after each optimizer step.

    The parts, in order: :func:`_set_up` (processes, folders, seed, freezing), :func:`_set_up_data` (dataset,
    sampler, loader), :func:`_set_up_optimization` (optimizer, schedule, loss, Mixup), :func:`_resume_or_start`
    (checkpoint, EMA, DDP), then per epoch :func:`_train_epoch` (the loop), :func:`_log_epoch` and
    :func:`_save_checkpoint`, and :func:`_finish` (summary, validation, results.json).
    """
    run = _set_up(model, config)
    run.data_config, run.predict = data_config, predictor(unwrap(model))
    _set_up_data(run)
    _set_up_optimization(run)
    _resume_or_start(run)
    run.begin = time.perf_counter()
    for epoch in range(run.start_epoch, config.epochs):
        loss_sum, count = _train_epoch(run, epoch, on_step)
        if run.stopped:
            break
        _log_epoch(run, epoch, float(loss_sum) / max(count, 1))
        if run.is_main:
            _save_checkpoint(run, epoch)
        if run.world > 1:
            dist.barrier()
    return _finish(run)


def _set_up(model: nn.Module, config: TrainConfig) -> _Run:
    """Join the processes, make the output folder (rank 0), seed, move the model, freeze what the config says."""
    rank, world, device, joined = _distributed()
    out = Path(config.out)
    ckpt_dir = Path(config.checkpoint_dir or config.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    model.to(device)
    frozen = freeze_first_blocks(model, config.freeze_blocks) if config.freeze_blocks else []
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise InputError("nothing to train: every parameter is frozen")
    return _Run(model=model, config=config, rank=rank, world=world, device=device, joined=joined, out=out,
                ckpt_dir=ckpt_dir, frozen=frozen, trainable=trainable)


def _set_up_data(run: _Run) -> None:
    """The training set (optionally a fixed random subset), its distributed sampler and loader."""
    config = run.config
    if config.clips and config.cutmix > 0:
        raise InputError("cutmix cuts boxes out of images (the last two dimensions); it is not defined for clips")
    dataset = _image_folder(config.data, _data_transform(run.model, config, True, run.data_config), config.clips)
    if config.subset is not None and config.subset < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
        dataset = Subset(dataset, sorted(order[:config.subset].tolist()))
    sampler = DistributedSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, persistent_workers=config.num_workers > 0)
    if len(loader) == 0:
        raise InputError(f"{len(dataset)} images give no full batch of {config.batch_size} x {run.world} processes")
    run.dataset, run.sampler, run.loader, run.steps_per_epoch = dataset, sampler, loader, len(loader)


def _set_up_optimization(run: _Run) -> None:
    """AdamW (no weight decay on biases, norms, tokens and position embeddings; the head's own learning rate),
    the warm-up + cosine schedule per update, and the loss (soft targets under Mixup/CutMix)."""
    config, model = run.config, run.model
    total_steps = run.steps_per_epoch * config.epochs
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = not (p.ndim <= 1 or name.endswith(("token", "pos_embed", "global_centres")))
            is_head = name.startswith(("head.", "vit.head.", "head_dist.", "vit.head_dist."))
            groups.setdefault((decays, is_head), []).append(p)
    run.optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": config.weight_decay if decays else 0.0,
          "lr": config.lr * (config.head_lr_scale if is_head else 1.0)}
         for (decays, is_head), params in sorted(groups.items())], lr=config.lr)
    warmup = int(round(config.warmup_epochs * run.steps_per_epoch))
    run.scheduler = CosineLRScheduler(run.optimizer, t_initial=max(total_steps - warmup, 1), lr_min=config.min_lr,
                                      warmup_t=warmup, warmup_lr_init=config.lr * 1e-3, warmup_prefix=True,
                                      t_in_epochs=False)

    if config.mixup > 0 or config.cutmix > 0:
        num_classes = classes_of(unwrap(model))
        run.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                          label_smoothing=config.label_smoothing, num_classes=num_classes)
        run.criterion = SoftTargetCrossEntropy()
    else:
        run.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def _resume_or_start(run: _Run) -> None:
    """Load a training checkpoint when ``config.resume`` names one; make the EMA copy; wrap in DDP."""
    config, model = run.config, run.model
    state = None
    if config.resume:
        state = _read_checkpoint(config.resume)
        unwrap(model).load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.start_epoch, run.step = state["epoch"] + 1, state["step"]
        run.history = list(state.get("history", []))
    run.ema = ModelEmaV3(unwrap(model), decay=config.ema_decay) if config.ema_decay else None
    if run.ema is not None and state is not None and state.get("ema") is not None:
        run.ema.module.load_state_dict(state["ema"])

    run.net = model
    if run.world > 1:
        device = run.device
        run.net = nn.parallel.DistributedDataParallel(model,
                                                      device_ids=[device.index] if device.type == "cuda" else None)


def _train_epoch(run: _Run, epoch: int, on_step: Callable[[int, float], None] | None) -> tuple[torch.Tensor, int]:
    """One epoch of optimizer steps (reseeded, sampler set to the epoch); (sum of the losses, steps).
    Sets ``run.stopped`` when ``max_steps`` is reached."""
    config, device = run.config, run.device
    _seed_epoch(config.seed, epoch, run.rank)
    run.sampler.set_epoch(epoch)
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (run.is_main and config.progress),
               dynamic_ncols=True, mininterval=5.0)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        if run.mixup is not None:
            images, labels = run.mixup(images, labels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = run.predict(run.net, images)
        loss = run.criterion(logits.float(), labels)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(run.trainable, config.grad_clip)
        run.optimizer.step()
        run.step += 1
        run.scheduler.step_update(run.step)
        if run.ema is not None:
            run.ema.update(unwrap(run.model), step=run.step)
        loss_value = float(loss.detach())  # once per step, outside the forward pass
        loss_sum += loss_value
        count += 1
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
        if on_step is not None:
            on_step(run.step, loss_value)
        if config.max_steps is not None and run.step >= config.max_steps:
            run.stopped = True
            break
    return loss_sum, count


def _log_epoch(run: _Run, epoch: int, mean_loss: float) -> None:
    """The epoch's mean loss (averaged over the processes) into the history, and printed by rank 0."""
    if run.world > 1:
        reduced = torch.tensor([mean_loss], dtype=torch.float64)
        dist.all_reduce(reduced)
        mean_loss = float(reduced) / run.world
    run.history.append({"epoch": epoch + 1, "step": run.step, "loss": mean_loss,
                        "lr": run.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - run.begin})
    if run.is_main:
        print(f"epoch {epoch + 1}/{run.config.epochs}: mean loss {mean_loss:.4f}, step {run.step}", flush=True)


def _save_checkpoint(run: _Run, epoch: int) -> None:
    """``<checkpoint_dir>/last.pth``, atomically: everything a resumed run needs."""
    _atomic_save({"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
                  "scheduler": run.scheduler.state_dict(), "epoch": epoch, "step": run.step,
                  "ema": None if run.ema is None else run.ema.module.state_dict(), "history": run.history,
                  "config": asdict(run.config)}, run.ckpt_dir / "last.pth")


def _finish(run: _Run) -> dict:
    """The run's summary, the validation top-1 (rank 0, a finished run), ``results.json``; leave the group."""
    config, world = run.config, run.world
    result = {
        "config": asdict(config),
        "world_size": world,
        "global_batch": config.batch_size * world,
        "steps": run.step,
        "steps_per_epoch": run.steps_per_epoch,
        "epochs_completed": len(run.history),
        "images_seen": run.step * config.batch_size * world,
        "train_images": len(run.dataset),
        "history": run.history,
        "wall_seconds": time.perf_counter() - run.begin,
        "stopped_early": run.stopped,
        "frozen_parameters": len(run.frozen),
        "trainable_parameters": sum(p.numel() for p in run.trainable),
        "checkpoint": str(run.ckpt_dir / "last.pth"),
    }
    if config.val_data and run.is_main and not run.stopped:
        final = run.ema.module if run.ema is not None else unwrap(run.model)
        result["val"] = evaluate(final, config.val_data, config.val_per_class, config.batch_size,
                                 _data_transform(run.model, config, False, run.data_config), config.progress,
                                 config.bf16, config.clips)
        result["val"].pop("predictions")
    if run.is_main:
        (run.out / "results.json").write_text(json.dumps(result, indent=2))
    if run.joined:
        dist.destroy_process_group()
    return result


def lr_for_batch(base_lr: float, global_batch: int, reference: int = 512) -> float:
    """The paper's linear scaling: ``base_lr * global_batch / reference``."""
    return base_lr * global_batch / reference

