"""The training step's speed switches (optim.precision, channels_last, compile) on CPU.

Each switch must be usable by training, not only by the benchmarks, so each is run
through one real `Trainer.step` here: the loss is finite and the parameters move.
`torch.compile` runs on a tiny model because its first (compiling) step is the slow part.
"""

import ast
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from san import engine
from san.config import load_config
from san.data.transforms import jitter_params, normalize
from san.engine import Trainer, evaluate, finished_views, probe_pixels
from san.metrics import ConfusionMatrix, LinearProbe
from san.models import create_model

TINY = [
    "model.encoder=resnet10t",
    "model.vit_depth=1",
    "model.embed_dim=16",
    "model.decoder_dim=8",
    "model.vit_patch_size=8",
    "model.n_clusters=3",
    "data.image_size=32",
    "optim.batch_size=2",
    "optim.warmup_steps=1",
]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core CI machine two OpenMP threads run these steps
    up to 10x slower than one when other jobs hold the cores (measured in benchmarks/)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pair_batch(n: int, size: int) -> dict:
    """A two-view batch of the shape train_pair_transform gives (identical views, no flip)."""
    generator = torch.Generator().manual_seed(0)
    view = torch.randn(n, 3, size, size, generator=generator)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n)
    flip = torch.zeros(n, dtype=torch.bool)
    return {"view1": view, "view2": view.clone(), "box1": box, "box2": box, "flip1": flip,
            "flip2": flip}  # fmt: skip


def test_step_finishes_the_loaders_uint8_views_as_pre_finished_ones_train():
    """Loader batches carry uint8 views and their colour-jitter numbers; Trainer.step
    finishes them on its device and trains exactly as on the same views finished first."""
    cfg = load_config(None, TINY)
    generator = torch.Generator().manual_seed(1)
    n, size = cfg.optim.batch_size, cfg.data.image_size
    raw = pair_batch(n, size)
    for key in ("view1", "view2"):
        raw[key] = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    for key in ("jitter1", "jitter2"):
        raw[key] = torch.tensor(
            [jitter_params(0.4, torch.rand(4, generator=generator).tolist()) for _ in range(n)]
        )
    finished = finished_views(raw, colour_jitter=True)
    assert finished.dtype == torch.float32 and finished.shape == (2 * n, 3, size, size)
    ready = {**raw, "view1": finished[:n], "view2": finished[n:]}
    losses = []
    for batch in (raw, ready):
        torch.manual_seed(0)
        trainer = Trainer(create_model(cfg), cfg, torch.device("cpu"))
        losses.append(trainer.step(batch))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-5, abs=1e-6), key
    assert raw["view1"].dtype == torch.uint8  # the caller's batch is left as it was


def one_step(*overrides: str) -> tuple[Trainer, dict, float]:
    cfg = load_config(None, TINY + list(overrides))
    torch.manual_seed(0)
    model = create_model(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, cfg, torch.device("cpu"))
    start = time.perf_counter()
    losses = trainer.step(pair_batch(cfg.optim.batch_size, cfg.data.image_size))
    elapsed = time.perf_counter() - start
    changed = sum(
        not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)
    )
    assert changed > len(before) // 2, f"only {changed}/{len(before)} parameters changed"
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    return trainer, losses, elapsed


def test_step_fp32_baseline():
    _, losses, _ = one_step()
    assert losses["loss"] > 0


def test_step_bf16_autocast_computes_the_losses_in_float32():
    """The model runs in bf16; its outputs reach the losses as float32 (in bf16 the MI
    term's joint distribution and logs would keep 8 significant bits)."""
    trainer, losses, _ = one_step("optim.precision=bf16")
    assert losses["loss"] > 0
    seen = []
    loss_fn = trainer.loss_fn

    def recording_loss(out1, out2, batch):
        seen.extend(value.dtype for value in (*out1.values(), *out2.values()))
        return loss_fn(out1, out2, batch)

    trainer.loss_fn = recording_loss
    with engine.autocast(trainer.device, "bf16"):
        model_dtypes = {v.dtype for v in trainer.model(pair_batch(2, 32)["view1"]).values()}
    assert model_dtypes == {torch.bfloat16}  # what the losses would get without the cast
    trainer.step(pair_batch(2, 32))
    assert seen and set(seen) == {torch.float32}


def attention_kernels(trainer: Trainer, cfg) -> set[str]:
    """The scaled-dot-product-attention kernels one training step ran (from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(pair_batch(cfg.optim.batch_size, cfg.data.image_size))
    names = {event.key for event in prof.key_averages()}
    return {name for name in names if "attention" in name}


@pytest.mark.parametrize(
    ("precision", "image_size", "math"),
    [("bf16", 32, True), ("none", 32, False), ("bf16", 136, False)],
)
def test_cpu_bf16_training_uses_math_attention_for_short_sequences(precision, image_size, math):
    """On CPU under bf16 the flash-attention backward costs several times the math kernel
    up to ~150 tokens (engine.CPU_BF16_MATH_ATTENTION_MAX_TOKENS): the step picks math
    there (17 tokens at 32 px), and flash in float32 or for long sequences (290 tokens)."""
    cfg = load_config(
        None, [*TINY, f"optim.precision={precision}", f"data.image_size={image_size}"]
    )
    torch.manual_seed(0)
    trainer = Trainer(create_model(cfg), cfg, torch.device("cpu"))
    assert trainer.math_attention is math
    kernels = attention_kernels(trainer, cfg)
    flash = any("flash_attention" in name for name in kernels)
    assert flash is not math, kernels
    assert ("aten::_scaled_dot_product_attention_math" in kernels) is math, kernels


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(native, monkeypatch, caplog):
    """Without AMX or AVX512-BF16, bf16 is emulated on a CPU and a step runs 2.4-14x slower
    than float32; the user hears it once, at the start, with what to set instead."""
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    cfg = load_config(None, [*TINY, "optim.precision=bf16"])
    with caplog.at_level("WARNING", logger="san"):
        Trainer(create_model(cfg), cfg, torch.device("cpu"))
    warned = [r.getMessage() for r in caplog.records if "bf16 is emulated" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert all("optim.precision=none" in message for message in warned)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "native"),
    [(True, False, True), (False, True, True), (True, True, True), (False, False, False)],
)
def test_native_bf16_is_amx_or_avx512_bf16(amx, avx512_bf16, native, monkeypatch):
    """AVX512-BF16 alone (AMD Zen 4, Intel Cooper Lake) counts: there a bf16 step ran
    1.6-1.9x float32's speed, and it used to be warned against as if emulated."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert engine.cpu_has_native_bf16() is native


def test_math_attention_is_chosen_only_for_a_model_with_a_vit():
    iic = create_model(load_config(None, [*TINY, "model.name=iic"]))
    assert not engine.uses_math_attention(iic, torch.device("cpu"), "bf16")


def _imported_by(modules: list[str], watched: list[str]) -> list[str]:
    """Which of `watched` a fresh interpreter has imported after importing `modules`."""
    code = f"import sys, {', '.join(modules)}; print([m for m in {watched} if m in sys.modules])"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip())


def test_pipeline_drivers_start_without_the_model_libraries():
    """The drivers (train.py, tune.py and each Tune trial's, evaluate.py, predict.py) import
    the engine and the training loop but build no model before their work starts: timm and
    torchvision (which timm imports, and which imports torch._dynamo) must stay unimported,
    ~3 s of start-up for every driver process on a 2-core machine."""
    drivers = ["train", "tune", "loop", "evaluate", "predict"]
    modules = [f"pipelines.{name}" for name in drivers]
    assert _imported_by(modules, ["timm", "torchvision", "san.models"]) == []


def test_training_workers_of_rank_above_0_do_not_import_mlflow():
    """A Ray Train worker imports pipelines.loop; only rank 0 logs to MLflow, so the other
    ranks must not pay mlflow's import (1.5 s CPU and 80 MB each, on every node)."""
    assert _imported_by(["pipelines.loop"], ["mlflow"]) == []


def test_adamw_is_fused_on_cpu_and_takes_over_an_unfused_state():
    """build_optimizer picks the fused AdamW on CPU too; resuming from a checkpoint whose
    optimizer state came from torch's default AdamW (what it used on CPU before) keeps the
    fused kernel, and training goes on."""
    trainer, _, _ = one_step()
    assert trainer.optimizer.defaults["fused"] is True
    model = trainer.model
    unfused = torch.optim.AdamW([{**g, "fused": None} for g in trainer.optimizer.param_groups])
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    unfused.step()
    resumed = Trainer(model, trainer.cfg, torch.device("cpu"))
    resumed.load_state_dict({**trainer.state_dict(), "optimizer": unfused.state_dict()})
    assert all(group["fused"] is True for group in resumed.optimizer.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    resumed.optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _stepped_with(trainer: Trainer, grads: list[torch.Tensor]) -> None:
    for param, grad in zip(trainer.model.parameters(), grads, strict=True):
        param.grad = torch.empty_like(param).copy_(grad)  # the parameter's layout
    trainer.optimizer.step()


def test_resume_under_another_channels_last_keeps_the_moments_with_their_weights():
    """The fused AdamW reads each moment in its parameter's memory order: moments saved
    under optim.channels_last=true and loaded into plain weights (or the reverse) were
    paired with the wrong elements, a silent drift. Now the step after either resume equals
    the step after a resume in the saved layout."""
    cfg = load_config(None, [*TINY, "optim.channels_last=true", "optim.lr=0.1"])
    torch.manual_seed(0)
    trainer = Trainer(create_model(cfg), cfg, torch.device("cpu"))
    grads = [torch.randn_like(p) for p in trainer.model.parameters()]
    _stepped_with(trainer, grads)
    weights, state = trainer.model.state_dict(), trainer.state_dict()
    assert any(  # the saved moments are channels-last
        v.dim() == 4
        and v.is_contiguous(memory_format=torch.channels_last)
        and not v.is_contiguous()
        for s in state["optimizer"]["state"].values()
        for v in s.values()
    )
    after = {}
    for channels_last in ("true", "false"):
        resumed_cfg = load_config(
            None, [*TINY, f"optim.channels_last={channels_last}", "optim.lr=0.1"]
        )
        model = create_model(resumed_cfg)
        model.load_state_dict(weights)
        resumed = Trainer(model, resumed_cfg, torch.device("cpu"))
        resumed.load_state_dict(copy.deepcopy(state))  # as read from a file: not shared
        _stepped_with(resumed, [g * 0.5 for g in grads])
        after[channels_last] = [p.detach().clone() for p in resumed.model.parameters()]
    for same, other in zip(after["true"], after["false"], strict=True):
        torch.testing.assert_close(other, same, rtol=0, atol=1e-6)


def test_resume_takes_this_runs_learning_rate_and_weight_decay():
    """The saved optimiser's lr and weight decay won over the config's on resume, while the
    run recorded the new values as in use; the schedule now goes on from the new base rate
    at the saved step. An empty loss-scaler state (a checkpoint saved without fp16 on a
    GPU) loads into an enabled scaler."""
    trainer, _, _ = one_step("optim.lr=1e-3", "optim.weight_decay=1e-4")
    state = trainer.state_dict()
    cfg = load_config(None, [*TINY, "optim.lr=1e-2", "optim.weight_decay=0.05"])
    resumed = Trainer(trainer.model, cfg, torch.device("cpu"))
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as fp16 on a GPU has it
    assert state["scaler"] == {}
    resumed.load_state_dict(state)
    step = resumed.scheduler.last_epoch
    assert step == 1
    factor = resumed.scheduler.lr_lambdas[0](step)
    decay, no_decay = resumed.optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1e-2 * factor)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    resumed.step(pair_batch(2, 32))
    assert decay["lr"] == pytest.approx(1e-2 * resumed.scheduler.lr_lambdas[0](step + 1))


@pytest.fixture
def one_process_group(tmp_path):
    """A real (gloo) process group of one rank, for DDP; destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "precision, compiled", [("fp32", False), ("bf16", False), ("fp16", False), ("bf16", True)]
)
def test_ddp_all_reduces_gradients_in_the_configured_precision(
    precision, compiled, one_process_group, monkeypatch
):
    """optim.grad_allreduce=bf16/fp16 makes DDP send (and so return) gradients rounded to
    that type, also under torch.compile; fp32 leaves them as backward made them. A model
    without DDP is left alone."""
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    overrides = [f"optim.grad_allreduce={precision}", "optim.grad_clip=0"]
    cfg = load_config(None, [*TINY, *overrides, f"optim.compile={str(compiled).lower()}"])
    torch.manual_seed(0)
    plain = create_model(cfg)
    assert not engine.compress_gradient_allreduce(plain, precision)
    model = torch.nn.parallel.DistributedDataParallel(plain)
    trainer = Trainer(model, cfg, torch.device("cpu"))
    trainer.step(pair_batch(cfg.optim.batch_size, cfg.data.image_size))
    assert (trainer.forward_model is not trainer.model) == compiled
    grads = [p.grad for p in plain.parameters() if p.grad is not None]
    assert len(grads) > len(list(plain.parameters())) // 2
    for dtype in (torch.bfloat16, torch.float16):
        rounded = all(torch.equal(g, g.to(dtype).float()) for g in grads)
        assert rounded == (precision == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])


def test_step_channels_last():
    trainer, _, _ = one_step("optim.channels_last=true")
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs
    ), "conv weights are not channels_last"


def test_step_bf16_channels_last_then_evaluate():
    trainer, _, _ = one_step("optim.precision=bf16", "optim.channels_last=true")
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32))
    result = evaluate(
        trainer.model, [{"image": images, "label": labels}], 3, torch.device("cpu"), "bf16"
    )
    assert int(result.confusion.matrix.sum()) == 2 * 32 * 32


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                os.environ.get("SAN_TEST_INDUCTOR") != "1",
                reason="inductor's cold C++ build of the model takes 80-90 s on 2 cores, which "
                "puts the suite over its 15 minutes on a busy machine; SAN_TEST_INDUCTOR=1 runs "
                "it (benchmarks/gpu_device.sh does); aot_eager runs the same checks",
            ),
        ),
    ],
)
def test_step_compile_tiny_model(backend, monkeypatch):
    """optim.compile=true computes the eager model's step: the same losses and gradients,
    to float rounding. With the capture-and-autograd-only backend, and with inductor, what
    users run (generated C++ kernels on CPU)."""
    monkeypatch.setattr(engine, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    eager, eager_losses, _ = one_step()
    trainer, losses, elapsed = one_step("optim.compile=true")
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-6)
    # Rounding grows through the backbone's BatchNorm backward (to ~1e-4 of a gradient's
    # norm with inductor's own reductions). Gradients that are zero in exact arithmetic
    # (a bias under an affine-free BatchNorm, the attention keys' bias) are rounding only.
    pairs = zip(eager.model.named_parameters(), trainer.model.parameters(), strict=True)
    for (name, expected), got in pairs:
        if expected.grad is not None and expected.grad.norm() > 1e-6:
            error = (got.grad - expected.grad).norm() / expected.grad.norm()
            assert error < 1e-3, f"{name}: gradient off by {error:.1e} of its norm"
    check_compiled_training(trainer)
    print(f"first compiled step {elapsed:.1f}s")


def test_step_compile_under_cpu_bf16_with_math_attention(monkeypatch):
    """Compile, bf16 autocast and the math-attention choice together (aot_eager backend)."""
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    trainer, _, _ = one_step("optim.compile=true", "optim.precision=bf16")
    assert trainer.math_attention
    check_compiled_training(trainer)
    # Compiled, the math kernel is decomposed into matmuls and softmax: no flash kernel runs
    # (in float32 the same compiled step runs flash forward and backward).
    kernels = attention_kernels(trainer, trainer.cfg)
    assert not any("flash_attention" in name for name in kernels), kernels


def check_compiled_training(trainer: Trainer) -> None:
    assert trainer.forward_model is not trainer.model  # the compiled wrapper is what ran
    # State dicts keep their plain keys: checkpoints of compiled runs load anywhere.
    assert not any(k.startswith("_orig_mod") for k in trainer.model.state_dict())
    # A second step reuses the compiled graph and still learns.
    second = trainer.step(pair_batch(2, 32))
    assert torch.isfinite(torch.tensor(second["loss"]))


def test_probe_sample_is_bounded():
    """The probe's fitting sample has a fixed size whatever the split's: per_image labelled
    pixels from each of the first max_images images, none from an unlabelled one."""
    cfg = load_config(None, TINY)
    model = create_model(cfg)
    model.train()
    model(torch.randn(2, 3, 32, 32))  # sets the running centres
    labels = torch.randint(0, 3, (10, 32, 32))
    labels[1] = 255  # no labelled pixel: contributes nothing
    batches = [
        {"image": torch.randn(2, 3, 32, 32), "label": labels[i : i + 2]} for i in range(0, 10, 2)
    ]
    feats, ids = probe_pixels(model, batches, torch.device("cpu"), per_image=8, max_images=4)
    assert feats.shape == (3 * 8, cfg.model.embed_dim) and feats.dtype == torch.float32
    assert ids.shape == (3 * 8,) and set(ids.tolist()) <= {0, 1, 2}
    read = []
    counted = (read.append(b) or b for b in batches)  # the loader's batches, as they are read
    again = probe_pixels(model, counted, torch.device("cpu"), per_image=8, max_images=4)
    assert torch.equal(feats, again[0]) and torch.equal(ids, again[1])  # seeded
    assert len(read) == 2  # no batch is read past the cap


def test_probe_labels_are_taken_at_the_embedding_cells_centres():
    """Each embedding cell of the fitting sample gets the label at its centre, where
    evaluation's bilinear upsampling places it; plain nearest took the top-left pixel."""
    cfg = load_config(None, TINY)
    model = create_model(cfg).eval()
    stride = cfg.model.stride
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, ::stride, ::stride] = 1  # each cell's top-left pixel
    batches = [{"image": torch.randn(1, 3, 32, 32), "label": labels}]
    _, ids = probe_pixels(model, batches, torch.device("cpu"), per_image=64, max_images=1)
    assert ids.numel() == (32 // stride) ** 2 and (ids == 0).all()


def test_evaluate_scores_the_probe_on_every_labelled_pixel():
    """The probe's confusion matrix counts every labelled val pixel once, its prediction
    being the probe's logits on the embedding map, upsampled as the clusters' are."""
    cfg = load_config(None, TINY)
    model = create_model(cfg)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (4, 32, 32), generator=generator)
    labels[:, :4] = 255
    images = torch.randn(4, 3, 32, 32, generator=generator)
    batches = [{"image": images[i : i + 2], "label": labels[i : i + 2]} for i in (0, 2)]
    weight = torch.randn(3, cfg.model.embed_dim, generator=generator)
    probe = LinearProbe(weight, torch.zeros(3))
    result = evaluate(model, batches, 3, torch.device("cpu"), probe=probe)
    assert int(result.probe_confusion.matrix.sum()) == int((labels != 255).sum())
    model.eval()
    with torch.no_grad():
        z = model(images)["z"]
    logits = torch.nn.functional.interpolate(
        probe.dense(z), size=(32, 32), mode="bilinear", align_corners=False
    )
    expected = ConfusionMatrix(3, 3)
    expected.update(logits.argmax(dim=1), labels)
    assert torch.equal(result.probe_confusion.matrix, expected.matrix)
    # A probe that always says class 2 puts every pixel in row 2.
    constant = LinearProbe(torch.zeros(3, cfg.model.embed_dim), torch.tensor([0.0, 0.0, 1.0]))
    rows = evaluate(model, batches, 3, torch.device("cpu"), probe=constant).probe_confusion
    assert int(rows.matrix[2].sum()) == int((labels != 255).sum())


def test_evaluate_normalises_the_loaders_uint8_images_as_pre_normalised_ones():
    """Evaluation batches leave the loader as uint8 images and uint8 labels; evaluate()
    normalises them on its device and scores exactly as on the same images normalised
    first (float batches are taken as normalised)."""
    cfg = load_config(None, TINY)
    model = create_model(cfg)
    model.train()
    model(torch.randn(2, 3, 32, 32))  # sets the running centres
    generator = torch.Generator().manual_seed(2)
    loader = [
        {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=generator),
         "label": torch.randint(0, 3, (2, 32, 32), dtype=torch.uint8, generator=generator)}
        for _ in range(3)
    ]  # fmt: skip
    ready = [{"image": normalize_batch(b["image"]), "label": b["label"].long()} for b in loader]
    probe = LinearProbe(torch.randn(3, cfg.model.embed_dim, generator=generator), torch.zeros(3))
    kept = {"n_viz": 2, "probe": probe}
    from_loader = evaluate(model, loader, 3, torch.device("cpu"), **kept)
    normalised = evaluate(model, ready, 3, torch.device("cpu"), **kept)
    assert from_loader.n_images == 6 and int(from_loader.confusion.matrix.sum()) == 6 * 32 * 32
    assert torch.equal(from_loader.confusion.matrix, normalised.confusion.matrix)
    assert torch.equal(from_loader.viz_images[0], normalised.viz_images[0])
    assert from_loader.viz_images[0].dtype == torch.float32
    assert torch.equal(from_loader.probe_confusion.matrix, normalised.probe_confusion.matrix)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([normalize(image) for image in images])


@pytest.mark.parametrize("precision", ["fp16"])
def test_fp16_on_cpu_runs_without_scaler(precision):
    """fp16 autocast on CPU has no GradScaler (CUDA only) but must still step."""
    trainer, _, _ = one_step(f"optim.precision={precision}")
    assert not trainer.scaler.is_enabled()
