"""Model shapes, loss terms and their gradients."""

import pytest
import torch
import torch.nn.functional as F

from san.config import ConfigError, load_config
from san.engine import Trainer, split_outputs
from san.losses import SANLoss, consistency_loss, mutual_information_loss, orthogonality_loss
from san.models import create_model
from san.models.seat import SEAT

TINY = ["model.encoder=resnet10t", "model.vit_depth=1", "model.embed_dim=16", "model.decoder_dim=8"]


def tiny_cfg(*overrides):
    return load_config(None, TINY + list(overrides))


@pytest.mark.parametrize(("size", "k", "stride"), [(32, 3, 8), (64, 7, 8), (48, 5, 4)])
def test_san_output_shapes(size, k, stride):
    cfg = tiny_cfg(
        f"data.image_size={size}",
        f"model.n_clusters={k}",
        f"model.stride={stride}",
        "model.vit_patch_size=8" if size % 16 else "model.vit_patch_size=16",
    )
    model = create_model(cfg)
    out = model(torch.randn(2, 3, size, size))
    h = size // stride
    assert out["z"].shape == (2, 16, h, h)
    assert out["logits"].shape == (2, k, h, h)
    assert out["centres"].shape == (k, 16)
    assert out["recon"].shape == (2, 3, size, size)
    torch.testing.assert_close(out["assign"].sum(1), torch.ones(2, h, h))
    model.eval()
    assert model.predict(torch.randn(2, 3, size, size)).shape == (2, size, size)


@pytest.mark.parametrize("name", ["iic", "kmeans"])
def test_baseline_shapes(name):
    cfg = tiny_cfg(f"model.name={name}", "data.image_size=32", "model.n_clusters=4")
    model = create_model(cfg)
    out = model(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 4, 4, 4)
    model.eval()
    assert model.predict(torch.randn(1, 3, 32, 32)).max() < 4


def test_eval_uses_running_centres_so_prediction_is_batch_independent():
    cfg = tiny_cfg("data.image_size=32", "model.vit_patch_size=8")
    model = create_model(cfg)
    images = torch.randn(4, 3, 32, 32)
    model.train()
    model(images)
    model.eval()
    alone = model.predict(images[:1])
    together = model.predict(images)[:1]
    assert torch.equal(alone, together)


def make_batch(n=2, size=32):
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1)
    flip = torch.zeros(n, dtype=torch.bool)
    views = torch.randn(n, 3, size, size)
    return {
        "view1": views,
        "view2": views.flip(-1),
        "box1": box,
        "box2": box,
        "flip1": flip,
        "flip2": ~flip,
    }


def forward_pair(model, batch):
    both = model(torch.cat([batch["view1"], batch["view2"]]))
    return split_outputs(both, batch["view1"].shape[0])


@pytest.mark.parametrize("space", ["unit", "raw"])
def test_every_term_finite_and_reaches_its_parameters(space):
    cfg = tiny_cfg("data.image_size=32", "model.vit_patch_size=8", f"model.seat_space={space}")
    model = create_model(cfg)
    batch = make_batch()
    loss_fn = SANLoss(cfg.loss)
    out1, out2 = forward_pair(model, batch)
    _, terms = loss_fn(out1, out2, batch)
    assert set(terms) == {"mi", "con", "rec", "orth"}
    # Which parameters each term must reach.
    reaches = {
        "mi": ["encoder", "semantic"],
        "con": ["encoder", "semantic"],
        "rec": ["encoder", "semantic", "decoder"],
        "orth": ["semantic"],
    }
    for name, value in terms.items():
        assert torch.isfinite(value), name
        if name != "mi":
            assert value >= 0, name
        model.zero_grad()
        out1, out2 = forward_pair(model, batch)
        _, terms_again = loss_fn(out1, out2, batch)
        terms_again[name].backward()
        for part in reaches[name]:
            grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads), f"{name} -> {part}"
        if name == "orth":
            assert all(
                p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder.parameters()
            )


def test_weight_zero_removes_term_and_its_compute():
    cfg = tiny_cfg("data.image_size=32", "model.vit_patch_size=8", "loss.w_rec=0", "loss.w_orth=0")
    model = create_model(cfg)
    assert model.decoder is None  # L_rec off: no decoder is built or run
    batch = make_batch()
    out1, out2 = forward_pair(model, batch)
    total, terms = SANLoss(cfg.loss)(out1, out2, batch)
    assert set(terms) == {"mi", "con"}
    torch.testing.assert_close(total, terms["mi"] * cfg.loss.w_mi + terms["con"] * cfg.loss.w_con)


def test_kmeans_without_reconstruction_trains_every_parameter_it_has():
    """DDP (find_unused_parameters off) fails at the second step when a parameter gets no
    gradient: k-means built its decoder even with L_rec off, which nothing then trained."""
    cfg = tiny_cfg("model.name=kmeans", "data.image_size=32", "loss.w_rec=0")
    model = create_model(cfg)
    assert model.decoder is None
    batch = make_batch()
    out1, out2 = forward_pair(model, batch)
    total, terms = SANLoss(cfg.loss)(out1, out2, batch)
    assert set(terms) == {"mi"}
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
    # A checkpoint from before, with its untrained decoder, still loads.
    with_decoder = create_model(tiny_cfg("model.name=kmeans", "data.image_size=32"))
    model.load_state_dict(with_decoder.state_dict())
    torch.testing.assert_close(model.encoder.state_dict(), with_decoder.encoder.state_dict())


def test_vit_weights_load_as_published_resampled_to_this_grid(tmp_path):
    """A published ViT checkpoint (224 px, patch 16, with its classifier, wrapped as timm
    and DINO save them) for a 32-px, patch-8 model: refused before, as it did not fit."""
    import timm

    from san.models.semantic import SemanticGenerator

    published = timm.create_model("vit_tiny_patch16_224", depth=1)
    path = tmp_path / "vit.pth"
    torch.save({"model": published.state_dict()}, path)
    vit = SemanticGenerator("vit_tiny_patch16_224", 32, 8, 3, 16, depth=1, weights=str(path)).vit
    assert vit.pos_embed.shape == (1, 1 + 4 * 4, 192) and vit.patch_embed.proj.kernel_size == (8, 8)
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, published.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(vit.pos_embed[:, 0], published.pos_embed[:, 0])  # class token's
    # The driver's check of the file (on the meta device): quiet when it fits.
    import warnings

    from san.models import check_model_config

    fits = tiny_cfg("data.image_size=32", "model.vit_patch_size=8", f"model.vit_weights={path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model_config(fits, read_weights=True)
    other = tmp_path / "small.pth"  # another width: one line naming the file
    torch.save(timm.create_model("vit_small_patch16_224", depth=1).state_dict(), other)
    with pytest.raises(ValueError, match=r"^model.vit_weights='.*small.pth' does not fit "):
        SemanticGenerator("vit_tiny_patch16_224", 32, 8, 3, 16, depth=1, weights=str(other))


@pytest.mark.parametrize("space", ["unit", "raw"])
def test_seat_reconstructs_in_the_configured_space(space):
    """ "unit": Z' = A norm(S) against norm(Z); "raw" (DESIGN.md's formula): Z' = A S
    against Z. The assignment is the same cosine softmax in both."""
    z = torch.randn(2, 16, 4, 4) * 3.0
    centres = torch.randn(5, 16) * 2.0
    out = SEAT(tau=0.2, space=space)(z, centres)
    cosine = torch.einsum("bdhw,kd->bkhw", F.normalize(z, dim=1), F.normalize(centres, dim=1))
    torch.testing.assert_close(out["assign"], (cosine / 0.2).softmax(dim=1))
    unit = space == "unit"
    basis = F.normalize(centres, dim=1) if unit else centres
    expected = torch.einsum("bkhw,kd->bdhw", out["assign"], basis)
    torch.testing.assert_close(out["z_rec"], expected)
    torch.testing.assert_close(out["z_con"], F.normalize(z, dim=1) if unit else z)
    # Raw L_con sees lengths: halving Z and S lowers it; on the sphere it is unchanged.
    shrunk = SEAT(tau=0.2, space=space)(z / 2, centres / 2)
    before = consistency_loss(out["z_con"], out["z_rec"])
    after = consistency_loss(shrunk["z_con"], shrunk["z_rec"])
    if unit:
        torch.testing.assert_close(after, before)
    else:
        torch.testing.assert_close(after, before / 4)


def test_seat_space_is_a_config_choice():
    model = create_model(tiny_cfg("model.seat_space=raw"))
    assert model.seat.space == "raw"
    with pytest.raises(ConfigError, match=r"model.seat_space='sphere' is not allowed; choose one"):
        tiny_cfg("model.seat_space=sphere")


def test_orthogonality_zero_for_orthonormal_centres():
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert orthogonality_loss(q[:5] * 3.0).item() == pytest.approx(0.0, abs=1e-5)
    assert orthogonality_loss(torch.ones(5, 16)).item() == pytest.approx(20.0, rel=1e-5)


def test_mutual_information_prefers_agreeing_views():
    labels = torch.randint(0, 4, (2, 8, 8))
    sharp = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    agree = mutual_information_loss(sharp, sharp, valid)
    uniform = torch.full_like(sharp, 0.25)
    assert agree < mutual_information_loss(sharp, uniform, valid) - 0.5
    # With one-hot, independent-of-nothing assignments, -MI = -H(clusters) ~ -log 4.
    assert agree.item() == pytest.approx(-torch.log(torch.tensor(4.0)).item(), abs=0.15)


def test_iic_uses_only_mi():
    cfg = tiny_cfg("model.name=iic", "data.image_size=32")
    model = create_model(cfg)
    batch = make_batch()
    out1, out2 = forward_pair(model, batch)
    _, terms = SANLoss(cfg.loss)(out1, out2, batch)
    assert set(terms) == {"mi"}


def test_trainer_step_changes_parameters_and_state_round_trips():
    cfg = tiny_cfg("data.image_size=32", "model.vit_patch_size=8", "optim.max_steps=5")
    model = create_model(cfg)
    trainer = Trainer(model, cfg, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    losses = trainer.step(make_batch(4))
    assert {"loss", "loss_mi", "loss_con", "loss_rec", "loss_orth"} <= set(losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    other = Trainer(create_model(cfg), cfg, torch.device("cpu"))
    other.load_state_dict(trainer.state_dict())
    assert other.scheduler.last_epoch == trainer.scheduler.last_epoch == 1


def _run_with_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and the gradient of a position-weighted sum of it with respect to x (weights
    that differ per pixel, so a misplaced gradient contribution shows)."""
    x = x.detach().requires_grad_()
    out = fn(x)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    return out.detach(), x.grad


def _compiled_graphs(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """fn compiled (graph capture and autograd, no code generation): output, input
    gradient and the text of the forward and backward graphs it ran."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph.code)
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    out, grad = _run_with_grad(compiled, x)
    torch._dynamo.reset()
    return out, grad, "\n".join(graphs)


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((2, 3, 5, 7), False), ((2, 4, 1, 6), False), ((3, 8, 6, 6), True)],
)
def test_upsample_matches_interpolate_and_compiles_without_a_scatter(shape, channels_last):
    """Under torch.compile an exact x2 bilinear resize takes the sliced path: the same
    values and gradients as F.interpolate, and no index_put (inductor's serial CPU
    scatter) in the backward graph, where compiling F.interpolate itself has one."""
    from san.models.upsample import upsample_bilinear

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    size = (2 * shape[2], 2 * shape[3])

    def reference(t):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    expected, expected_grad = _run_with_grad(reference, x)
    out, grad, graphs = _compiled_graphs(lambda t: upsample_bilinear(t, size), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert "index_put" not in graphs and "cat" in graphs
    _, _, interpolate_graphs = _compiled_graphs(reference, x)
    assert "index_put" in interpolate_graphs
    # Eager, and sizes that are not an exact doubling, use F.interpolate itself.
    torch.testing.assert_close(upsample_bilinear(x, size), expected, rtol=0, atol=0)
    odd = (2 * shape[2] - 1, 2 * shape[3] + 1)
    out, _, graphs = _compiled_graphs(lambda t: upsample_bilinear(t, odd), x)
    torch.testing.assert_close(
        out, F.interpolate(x, size=odd, mode="bilinear", align_corners=False)
    )
    assert "index_put" in graphs


def test_training_forward_is_one_graph_and_running_centres_average_the_batches():
    """The running centres take the first batch's centres, then a momentum average, with no
    Python branch on the buffer: torch.compile captures the training forward whole (a
    branch there split it in two and compiled again at the second step)."""
    cfg = tiny_cfg("data.image_size=32", "model.vit_patch_size=8")
    torch.manual_seed(0)
    model = create_model(cfg).train()
    first, second = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    centres1 = model(first)["centres"].detach()
    assert torch.equal(model.running_centres, centres1)
    centres2 = model(second)["centres"].detach()
    torch.testing.assert_close(model.running_centres, centres1.lerp(centres2, 0.1))
    assert int(model.centres_seen) == 2
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(first)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
