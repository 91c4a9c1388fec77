"""The pieces of a training run that do not depend on Ray or MLflow.

Pipelines own the loop (distribution, checkpoints, tracking); this module owns
what happens inside one step and one evaluation, so a plain PyTorch loop and the
Ray Train loop run exactly the same code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.attention import SDPBackend, sdpa_kernel

from san.config import Config, OptimConfig
from san.data.transforms import finish_views
from san.losses import SANLoss
from san.metrics import ConfusionMatrix, LinearProbe

log = logging.getLogger("san")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and the learned queries (1-d or tiny tensors)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith("queries") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (one pass per parameter, no per-op tensor lists) exists for CUDA and,
    # since torch 2.4, for CPU, where torch's default is a loop over the parameters (its
    # foreach kernels are for GPUs). On this project's CPU the fused step is 3-4x faster
    # (benchmarks/results/cpu_step.md): about 4% of a float32 training step, 7% of a bf16
    # one. Same update, rounded differently (parameters agree to 1e-7 after 20 steps).
    devices = {p.device.type for p in model.parameters()}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)


def compress_gradient_allreduce(model: nn.Module, precision: str) -> bool:
    """Make DDP all-reduce gradients in bf16/fp16 (`optim.grad_allreduce`); True if it does.

    A no-op for "fp32" and for a model that is not DDP-wrapped (one worker: nothing is
    all-reduced). Must run before the first backward, as DDP requires of comm hooks.
    """
    if precision == "fp32" or not isinstance(model, nn.parallel.DistributedDataParallel):
        return False
    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    model.register_comm_hook(None, hooks[precision])  # None: the default (world) group
    return True


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig):
    """Linear warm-up to cfg.lr, then cosine decay to 0 at max_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, precision: str):
    """Mixed precision as a config switch: "none", "bf16" or "fp16"."""
    if precision == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# PyTorch's CPU flash-attention backward in bf16 has a cost that short sequences do not
# amortise. Measured on an AMX-BF16 Xeon (forward + backward, 32 images x 3 heads of 64,
# 2 threads): flash 4.4 / 14.4 / 29.7 / 27.3 ms, the plain matmul-softmax ("math") kernel
# 1.0 / 4.3 / 16.9 / 33.2 ms at 17 / 65 / 145 / 197 tokens; the same crossover at 8 and
# 128 images and at 1 thread, and on an AVX512-BF16 EPYC (flash 5.5 / 16.4 / 41.6 / 44.8
# ms, math 1.2 / 5.7 / 25.7 / 46.8). In float32, and in any evaluation forward, flash is
# faster.
CPU_BF16_MATH_ATTENTION_MAX_TOKENS = 160


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AMX tiles (Intel Sapphire Rapids and
    later) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later).

    Where it does, bf16 beats float32: default.yaml's training step 1.7x with AMX (a
    Xeon), 1.6-1.8x with AVX512-BF16 (an AMD EPYC, where a bf16 matmul runs 2.3x float32's
    rate). Where it does not, oneDNN emulates bf16 and the step is slower than in float32:
    0.42x with AVX512, 0.07x with AVX2 (that Xeon with oneDNN limited to each instruction
    set; limited to AVX512-BF16 it gave 0.87x, which the EPYC's real AVX512-BF16 does not
    bear out). Unknown (a torch without these probes) counts as native: no warning.
    """
    # Both probes are private, in torch since 2.2.
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is None or avx512_bf16 is None:
        return True
    return bool(amx()) or bool(avx512_bf16())


def uses_math_attention(model: nn.Module, device: torch.device, precision: str) -> bool:
    """Whether a training step should run the ViT's attention with the math kernel."""
    if device.type != "cpu" or precision != "bf16":
        return False
    # Imported here: san.models imports timm (and torchvision), ~3 s of start-up that the
    # processes importing this module without building a model (every pipeline driver,
    # each Tune trial's driver) would pay.
    from san.models.semantic import SemanticGenerator

    lengths = [m.sequence_length for m in model.modules() if isinstance(m, SemanticGenerator)]
    return 0 < max(lengths, default=0) <= CPU_BF16_MATH_ATTENTION_MAX_TOKENS


def move_batch(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def finished_views(batch: dict, colour_jitter: bool) -> torch.Tensor:
    """Both views as one 2B x 3 x S x S float batch, view1's first.

    Views from the loader are uint8: their colour jitter (if `colour_jitter`) and
    ImageNet normalisation happen here, on the device the batch is on, in one pass over
    both views. Float views (pre-made batches in tests and benchmarks) are taken as
    already finished.
    """
    images = torch.cat([batch["view1"], batch["view2"]])
    if images.dtype != torch.uint8:
        return images
    jitter = torch.cat([batch["jitter1"], batch["jitter2"]]) if colour_jitter else None
    return finish_views(images, jitter)


# torch.compile backend used by `optim.compile`. Inductor generates fused kernels (C++ on
# CPU, Triton on GPU); most tests swap in "aot_eager" (same graph capture and autograd, no
# code generation): inductor's C++ build of even the tiny test model takes 80-90 s on 2
# cores (SAN_TEST_INDUCTOR=1 runs the inductor test).
COMPILE_BACKEND = "inductor"


def apply_memory_format(model: nn.Module, cfg: OptimConfig) -> nn.Module:
    """Convert a model's 4-d weights to channels_last when `optim.channels_last` is set.

    Call it on the bare model *before* DDP wrapping (DDP sizes its gradient buckets from
    the parameters' layout at construction); `Trainer` calls it too, which is a no-op for
    an already converted model and correct (if a little slower) for a wrapped one.
    """
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class Trainer:
    """One optimisation step of any registered model under SANLoss.

    Speed switches from `cfg.optim`, so a plain loop and the Ray loop get the same:
    `precision` (bf16/fp16 autocast; fp16 loss scaling on CUDA), `channels_last`
    (weights and input images in NHWC), `compile` (`torch.compile` of the model for the
    training forward; `self.model` stays the uncompiled module so state dicts and
    evaluation are unchanged), the fused AdamW on CUDA and CPU (`build_optimizer`), and
    `grad_allreduce` (DDP's gradient all-reduce in bf16/fp16, for a DDP-wrapped model).
    """

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device) -> None:
        self.model = apply_memory_format(model, cfg.optim)
        self.cfg = cfg
        self.device = device
        # Compiling the (possibly DDP-wrapped) module is what PyTorch recommends: the
        # compiled graph is split at DDP's bucket boundaries so all-reduce still overlaps
        # backward. The compiled wrapper shares parameters with self.model.
        self.forward_model = (
            torch.compile(model, backend=COMPILE_BACKEND) if cfg.optim.compile else model
        )
        self.loss_fn = SANLoss(cfg.loss)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        if device.type == "cpu" and cfg.optim.precision == "bf16" and not cpu_has_native_bf16():
            log.warning(
                "optim.precision=bf16 on a CPU without bf16 instructions (AMX or AVX512-BF16): "
                "bf16 is emulated here and slower than float32 (0.07-0.42x, by instruction "
                "set); use optim.precision=none"
            )
        self.math_attention = uses_math_attention(model, device, cfg.optim.precision)
        compressed = compress_gradient_allreduce(model, cfg.optim.grad_allreduce)
        if compressed and torch.distributed.get_rank() == 0:
            log.info("DDP all-reduces gradients in %s", cfg.optim.grad_allreduce)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=cfg.optim.precision == "fp16" and device.type == "cuda"
        )

    def step(self, batch: dict) -> dict[str, float]:
        self.model.train()
        batch = move_batch(batch, self.device)
        images = finished_views(batch, self.cfg.data.jitter > 0)
        n = images.shape[0] // 2
        batch = {**batch, "view1": images[:n], "view2": images[n:]}  # the loss reads them
        if self.cfg.optim.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        attention = (
            sdpa_kernel(SDPBackend.MATH) if self.math_attention else contextlib.nullcontext()
        )
        with autocast(self.device, self.cfg.optim.precision), attention:
            # One forward over both views: the centres are pooled from both, and
            # BatchNorm and the SEAT centres see the whole batch once.
            both = self.forward_model(images)
        if self.cfg.optim.precision != "none":
            # Autocast leaves the outputs in bf16/fp16, and ops outside it keep their inputs'
            # type: without this the losses (MI's joint distribution and its logs, the L2
            # means over every pixel) would be computed in half precision (bf16: 8 bits).
            both = {k: v.float() if v.is_floating_point() else v for k, v in both.items()}
        out1, out2 = split_outputs(both, n)
        total, terms = self.loss_fn(out1, out2, batch)
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} (terms: {_floats(terms)})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": total.item(), **{f"loss_{k}": v for k, v in _floats(terms).items()}}

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the optimiser, schedule and loss scaler, under this run's settings.

        What the saved state would otherwise carry over, and this Trainer corrects:
        - the param groups' kernel choice (unfused from a CPU checkpoint written before
          AdamW was fused there): the one made for this device;
        - the moments' memory layout: saved under another optim.channels_last, the fused
          kernel paired each weight with its moments' elements in the wrong order (a
          silent drift of 0.15 in one step of lr 0.1);
        - optim.lr and optim.weight_decay: the saved ones won, while the run recorded the
          new values as in use; the schedule then restarts from the new base rate at the
          saved step;
        - the loss scaler: an fp16 run on a GPU resumed from a checkpoint saved without one
          (float32, bf16, or fp16 on CPU workers) failed to load its empty state.
        """
        this_run = [
            {key: value for key, value in group.items() if key != "params"}
            for group in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, this_run, strict=True):
            group.update(settings)
            for param in group["params"]:
                for key, value in self.optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        if value.stride() != param.stride():
                            self.optimizer.state[param][key] = torch.empty_like(param).copy_(value)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [self.cfg.optim.lr] * len(self.optimizer.param_groups)
        for group, factor in zip(
            self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = self.cfg.optim.lr * factor(self.scheduler.last_epoch)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def split_outputs(outputs: dict[str, torch.Tensor], n: int) -> tuple[dict, dict]:
    """Split a two-view forward into per-view dicts; batch-wide tensors (centres) go to both."""
    first, second = {}, {}
    for key, value in outputs.items():
        if value.ndim >= 1 and value.shape[0] == 2 * n and key != "centres":
            first[key], second[key] = value[:n], value[n:]
        else:
            first[key] = second[key] = value
    return first, second


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


@dataclass
class EvalResult:
    """What one process saw during evaluation; the confusion matrices must be summed
    across processes."""

    confusion: ConfusionMatrix
    # The linear probe's predictions against the labels ([n_classes, n_classes]), when
    # evaluate() was given a probe.
    probe_confusion: ConfusionMatrix | None = None
    n_images: int = 0
    viz_images: list[torch.Tensor] = field(default_factory=list)
    viz_preds: list[torch.Tensor] = field(default_factory=list)
    viz_labels: list[torch.Tensor] = field(default_factory=list)


def _eval_batches(batches: Iterable[dict], device: torch.device, max_images: int):
    """(normalised images, long labels) on `device`, at most `max_images` images (0: all)."""
    seen = 0
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # from the loader; float batches come normalised
            images = finish_views(images, jitter=None)
        labels = batch["label"].to(device, non_blocking=True).long()
        if max_images:
            images, labels = images[: max_images - seen], labels[: max_images - seen]
        seen += images.shape[0]
        yield images, labels
        if max_images and seen >= max_images:
            return  # before the loader reads a batch that would go unused


def _upsampled_argmax(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Per-pixel class/cluster at the label's resolution (bilinear logits, as STEGO)."""
    logits = torch.nn.functional.interpolate(
        logits.float(), size=size, mode="bilinear", align_corners=False
    )
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    n_classes: int,
    device: torch.device,
    precision: str = "none",
    n_viz: int = 0,
    max_images: int = 0,
    probe: LinearProbe | None = None,
) -> EvalResult:
    """Stream batches through the model into a confusion matrix (never all predictions).

    A batch's "image" is uint8 B x 3 x S x S from `eval_sample_transform` (normalised
    here, on `device`) or already-normalised float; "label" holds class ids (255: ignore).

    Also keeps the first `n_viz` images for pictures and, given a fitted `probe`, scores
    its predictions on every labelled pixel into a second confusion matrix, so memory
    stays flat however many images are evaluated.
    """
    model.eval()
    result = EvalResult(ConfusionMatrix(model.n_clusters, n_classes, device=device))
    if probe is not None:
        probe = probe.to(device)
        result.probe_confusion = ConfusionMatrix(probe.n_classes, n_classes, device=device)
    for images, labels in _eval_batches(batches, device, max_images):
        with autocast(device, precision):
            outputs = model(images)
        preds = _upsampled_argmax(outputs["logits"], images.shape[-2:])
        result.confusion.update(preds, labels)
        if probe is not None:
            probe_preds = _upsampled_argmax(probe.dense(outputs["z"]), images.shape[-2:])
            result.probe_confusion.update(probe_preds, labels)
        result.n_images += images.shape[0]
        if len(result.viz_images) < n_viz:
            take = n_viz - len(result.viz_images)
            result.viz_images.extend(images[:take].cpu())
            result.viz_preds.extend(preds[:take].cpu())
            result.viz_labels.extend(labels[:take].cpu())
    return result


@torch.no_grad()
def probe_pixels(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    precision: str = "none",
    per_image: int = 64,
    max_images: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear probe's fitting sample: `per_image` random labelled pixel embeddings
    (float32 [N, D]) and their class ids ([N]) from each of the first `max_images` images
    of `batches` (batches as `evaluate` takes them). Embeddings are taken at their own
    resolution, each with the label at its cell's centre (nearest-exact: where `evaluate`'s
    bilinear upsampling puts the cell; plain nearest took the cell's top-left pixel, 3.5 px
    off at stride 8); images without labelled pixels give none."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    feats: list[torch.Tensor] = []
    labels_out: list[torch.Tensor] = []
    for images, labels in _eval_batches(batches, device, max_images):
        with autocast(device, precision):
            z = model(images)["z"].float()
        small = torch.nn.functional.interpolate(
            labels[:, None].float(), size=z.shape[-2:], mode="nearest-exact"
        )[:, 0].long()
        for image_feats, lab in zip(z.cpu(), small.cpu(), strict=True):
            flat_lab = lab.flatten()
            valid = (flat_lab != 255).nonzero().squeeze(1)
            pick = valid[torch.randperm(valid.numel(), generator=generator)[:per_image]]
            feats.append(image_feats.flatten(1).T[pick])
            labels_out.append(flat_lab[pick])
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels_out)
