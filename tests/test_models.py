"""The SupMAE network: every variant at tiny size, masking, the reference state-dict layout,
SDPA against eager attention, torch.compile, FLOP counts. CPU only, except the `gpu` test."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from supmae.errors import UserError
from supmae.losses import supmae_loss
from supmae.models import SupMAE, SupMAEOutput, create_model, list_models, model_defaults
from supmae.models.flops import count_flops, training_flops_per_image
from supmae.models.pos_embed import sincos_2d
from supmae.train.checkpoint import load_checkpoint, model_state

# Small enough that a forward + backward takes milliseconds; L = 16 patches at 16 px with patch 4.
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
        "decoder_num_heads": 2, "cls_hidden_dim": 24, "num_classes": 5}


def tiny(name: str = "supmae_vit_tiny_patch4", **overrides) -> SupMAE:
    args = {**TINY, "img_size": 16}
    args.update(overrides)
    return create_model(name, **args)


def images(model: SupMAE, n: int = 4, seed: int = 0) -> torch.Tensor:
    size = model.grid_size * model.patch_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the reference layout

BLOCK_SHAPES = {  # key suffix -> shape as a function of the block width w
    "norm1.weight": lambda w: (w,), "norm1.bias": lambda w: (w,),
    "attn.qkv.weight": lambda w: (3 * w, w), "attn.qkv.bias": lambda w: (3 * w,),
    "attn.proj.weight": lambda w: (w, w), "attn.proj.bias": lambda w: (w,),
    "norm2.weight": lambda w: (w,), "norm2.bias": lambda w: (w,),
    "mlp.fc1.weight": lambda w: (4 * w, w), "mlp.fc1.bias": lambda w: (4 * w,),
    "mlp.fc2.weight": lambda w: (w, 4 * w), "mlp.fc2.bias": lambda w: (w,),
}


def reference_shapes(d: int, depth: int, e: int, dec_depth: int, p: int, num_patches: int, hidden: int,
                     classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference implementation's state dict (REFERENCE-FACTS.md), 2-layer head."""
    s: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d), "pos_embed": (1, 1 + num_patches, d),
        "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        s.update({f"blocks.{i}.{k}": f(d) for k, f in BLOCK_SHAPES.items()})
    s.update({"norm.weight": (d,), "norm.bias": (d,),
              "decoder_embed.weight": (e, d), "decoder_embed.bias": (e,),
              "mask_token": (1, 1, e), "decoder_pos_embed": (1, 1 + num_patches, e)})
    for i in range(dec_depth):
        s.update({f"decoder_blocks.{i}.{k}": f(e) for k, f in BLOCK_SHAPES.items()})
    s.update({"decoder_norm.weight": (e,), "decoder_norm.bias": (e,),
              "decoder_pred.weight": (p * p * 3, e), "decoder_pred.bias": (p * p * 3,),
              "cls_head.0.weight": (hidden, d), "cls_head.0.bias": (hidden,),
              "cls_head.1.weight": (hidden,), "cls_head.1.bias": (hidden,),
              "cls_head.1.running_mean": (hidden,), "cls_head.1.running_var": (hidden,),
              "cls_head.1.num_batches_tracked": (),
              "cls_head.3.weight": (classes, hidden), "cls_head.3.bias": (classes,)})
    return s


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,dec_depth", [("mae_vit_base_patch16_dec512d1b", 1), ("mae_vit_base_patch16_dec512d8b", 8)])
def test_reference_variants_have_the_reference_state_dict(name: str, dec_depth: int) -> None:
    with torch.device("meta"):  # full size, no memory
        model = create_model(name)
    expected = reference_shapes(768, 12, 512, dec_depth, 16, 196, 3072, 1000)
    assert shapes_of(model) == expected
    # Reference defaults beyond the shapes: decoder heads, LayerNorm eps, qkv bias, fixed positions.
    assert model.decoder_blocks[0].attn.num_heads == 16 and model.blocks[0].attn.num_heads == 12
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_paper_default_is_the_1_block_decoder() -> None:
    d = model_defaults("mae_vit_base_patch16_dec512d1b")
    assert (d["decoder_embed_dim"], d["decoder_num_heads"], d["decoder_depth"]) == (512, 16, 1)
    assert (d["cls_head_layers"], d["cls_hidden_dim"], d["global_pool"]) == (2, 3072, True)
    assert model_defaults("mae_vit_base_patch16_dec512d8b")["decoder_depth"] == 8
    assert model_defaults("mae_vit_large_patch16_dec512d8b")["embed_dim"] == 1024
    assert model_defaults("mae_vit_huge_patch14_dec512d8b")["patch_size"] == 14
    small = model_defaults("supmae_vit_tiny_patch4")
    assert (small["img_size"], small["patch_size"]) == (32, 4)


def test_reference_checkpoint_loads_strictly_and_round_trips(tmp_path) -> None:
    model = tiny(img_size=16, depth=2, decoder_depth=2)
    expected = reference_shapes(32, 2, 16, 2, 4, 16, 24, 5)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=g) for k, shape in expected.items()}
    state["cls_head.1.num_batches_tracked"] = torch.tensor(7)
    state["cls_head.1.running_var"] = state["cls_head.1.running_var"].abs()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 3}, path)  # the reference's layout

    result = model.load_state_dict(model_state(load_checkpoint(str(path))), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    mine = model.state_dict()
    assert sorted(mine) == sorted(state)
    assert all(torch.equal(mine[k], state[k]) for k in state)
    # Saved again and reloaded into a fresh model: identical.
    torch.save({"model": mine}, tmp_path / "again.pth")
    fresh = tiny(img_size=16, depth=2, decoder_depth=2)
    fresh.load_state_dict(model_state(load_checkpoint(str(tmp_path / "again.pth"))), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)
    fresh.eval()
    assert fresh.classify(images(fresh)).shape == (4, 5)


# ---------------------------------------------------------------- every variant

@pytest.mark.parametrize("name", list_models())
def test_every_variant_forward_backward_at_tiny_size(name: str) -> None:
    defaults = model_defaults(name)
    patch = defaults["patch_size"]
    model = create_model(name, **TINY, img_size=4 * patch)  # 16 patches, the variant's own patch size
    assert model.model_args["name"] == name and model.patch_size == patch
    imgs = images(model, n=3)
    out = model(imgs, mask_ratio=0.75)
    assert isinstance(out, SupMAEOutput)
    assert out.loss_rec.shape == () and out.loss_rec.dtype == torch.float32
    assert out.pred.shape == (3, 16, patch * patch * 3) and out.pred.dtype == torch.float32
    assert out.mask.shape == (3, 16) and out.mask.dtype == torch.float32
    assert out.mask.sum(dim=1).tolist() == [12.0] * 3
    assert out.logits.shape == (3, 5)
    total, _, _ = supmae_loss(out, torch.tensor([0, 1, 4]))
    total.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert model.pos_embed.grad is None


def test_model_args_rebuild_the_same_architecture() -> None:
    model = tiny(decoder_depth=0, cls_head_layers=3, global_pool=False, attn_impl="eager")
    args = json.loads(json.dumps(model.model_args))  # plain types only
    rebuilt = create_model(**args)
    assert shapes_of(rebuilt) == shapes_of(model)
    assert rebuilt.model_args == model.model_args
    assert all(not b.attn.fused_attn for b in rebuilt.blocks)


def test_patchify_order_and_inverse() -> None:
    model = tiny()
    imgs = images(model, n=2)
    x = model.patchify(imgs)
    p, w = 4, 4
    for n, i, j in [(0, 0, 0), (1, 2, 3), (0, 3, 1)]:
        patch = imgs[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)  # (row, col, chan)
        assert torch.equal(x[n, i * w + j], patch)
    assert torch.equal(model.unpatchify(x), imgs)


def test_sincos_positions_layout() -> None:
    dim, gs = 16, 3
    table = sincos_2d(dim, gs, cls_token=True)
    assert table.shape == (1 + gs * gs, dim) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(dim))
    row = table[1 + 1 * gs + 2]  # patch at row y=1, column x=2
    omega = [1.0 / 10000 ** (i / 4) for i in range(4)]
    expected = ([math.sin(2 * o) for o in omega] + [math.cos(2 * o) for o in omega]
                + [math.sin(1 * o) for o in omega] + [math.cos(1 * o) for o in omega])
    torch.testing.assert_close(row, torch.tensor(expected))
    model = tiny()
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(32, 4, cls_token=True))
    torch.testing.assert_close(model.decoder_pos_embed[0], sincos_2d(16, 4, cls_token=True))


def test_initialisation_follows_the_reference() -> None:
    torch.manual_seed(0)
    model = create_model("supmae_vit_small_patch4", depth=1)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))  # xavier-uniform
            assert m.weight.abs().max() <= bound, name
            assert m.weight.abs().max() > 0.9 * bound, name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    w = model.patch_embed.proj.weight.reshape(model.patch_embed.proj.weight.shape[0], -1)
    assert w.abs().max() <= math.sqrt(6.0 / sum(w.shape))
    for token in (model.cls_token, model.mask_token):
        assert abs(token.std().item() - 0.02) < 0.006


# ---------------------------------------------------------------- masking

def _block0_input(model: SupMAE, imgs: torch.Tensor, **kw) -> tuple[SupMAEOutput, torch.Tensor]:
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        out = model(imgs, **kw)
    finally:
        handle.remove()
    return out, seen[0]


def test_noise_makes_masking_deterministic_as_the_reference() -> None:
    model = tiny()
    imgs = images(model)
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(3))
    out, tokens = _block0_input(model, imgs, mask_ratio=0.75, noise=noise)
    len_keep = int(16 * (1 - 0.75))
    ids_keep = torch.argsort(noise, dim=1)[:, :len_keep]
    # The mask removes exactly the other patches...
    expected_mask = torch.ones(4, 16)
    expected_mask.scatter_(1, ids_keep, 0.0)
    assert torch.equal(out.mask, expected_mask)
    # ...and the encoder sees the kept patches' embeddings in ascending-noise order, after the cls token.
    embedded = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    kept = torch.stack([embedded[n, ids_keep[n]] for n in range(4)])
    assert torch.equal(tokens[:, 1:], kept.detach())
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1]).expand(4, -1, -1)[:, 0])
    # Same noise, same everything.
    again = model(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(again.mask, out.mask) and torch.equal(again.pred, out.pred)


@pytest.mark.parametrize("img_size,ratio", [(16, 0.75), (28, 0.75), (28, 0.6), (16, 0.0)])
def test_encoder_sees_only_visible_tokens(img_size: int, ratio: float) -> None:
    model = tiny(img_size=img_size)
    num_patches = (img_size // 4) ** 2
    out, tokens = _block0_input(model, images(model, n=2), mask_ratio=ratio)
    kept = int(num_patches * (1 - ratio))
    assert tokens.shape == (2, 1 + kept, 32)
    assert out.mask.sum(dim=1).tolist() == [float(num_patches - kept)] * 2


def test_masked_pixels_get_no_gradient_from_the_logits() -> None:
    model = tiny()
    model.eval()  # BatchNorm on running statistics: samples do not mix through batch statistics
    imgs = images(model).requires_grad_(True)
    out = model(imgs, mask_ratio=0.75)
    out.logits.sum().backward()
    grad = model.patchify(imgs.grad).abs().sum(-1)  # [N, L]
    removed = out.mask.bool()
    assert torch.equal(grad[removed], torch.zeros_like(grad[removed]))
    assert (grad[~removed] > 0).all()


def test_zero_mask_ratio_gives_a_finite_zero_reconstruction_loss() -> None:
    model = tiny()
    out = model(images(model), mask_ratio=0.0)
    assert out.mask.sum().item() == 0 and out.loss_rec.item() == 0.0


# ---------------------------------------------------------------- branches and heads

def test_head_layouts() -> None:
    keys = lambda m: sorted(k for k in m.state_dict() if k.startswith("cls_head"))
    assert keys(tiny(cls_head_layers=1)) == ["cls_head.bias", "cls_head.weight"]
    assert keys(tiny(cls_hidden_dim=0)) == ["cls_head.bias", "cls_head.weight"]  # the reference's switch
    three = tiny(cls_head_layers=3)
    assert [type(m).__name__ for m in three.cls_head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert three(images(three)).logits.shape == (4, 5)
    none = tiny(cls_head_layers=0)
    out = none(images(none))
    assert out.logits is None and keys(none) == []


def test_classification_only_and_reconstruction_only() -> None:
    cls_only = tiny(use_decoder=False)
    assert not any(k.startswith(("decoder", "mask_token")) for k in cls_only.state_dict())
    out = cls_only(images(cls_only))
    assert out.pred is None and out.loss_rec.item() == 0.0 and out.logits.shape == (4, 5)
    total, rec, _ = supmae_loss(out, torch.zeros(4, dtype=torch.long))
    total.backward()
    assert rec.item() == 0.0
    with pytest.raises(UserError, match="nothing to train"):
        tiny(use_decoder=False, cls_head_layers=0)


def test_decoder_depth_zero_is_embed_norm_pred() -> None:
    model = tiny(decoder_depth=0)
    assert len(model.decoder_blocks) == 0
    out = model(images(model))
    out.loss_rec.backward()
    assert model.decoder_pred.weight.grad is not None and model.decoder_embed.weight.grad is not None


@pytest.mark.parametrize("global_pool", [True, False])
def test_pooling_feeds_the_head(global_pool: bool) -> None:
    model = tiny(global_pool=global_pool)
    model.eval()
    imgs = images(model)
    noise = torch.rand(4, 16)
    latent, _, _ = model.forward_encoder(imgs, 0.75, noise)
    feat = latent[:, 1:].mean(1) if global_pool else latent[:, 0]
    torch.testing.assert_close(model(imgs, noise=noise).logits, model.cls_head(feat))


def test_classify_sees_every_patch_and_skips_the_decoder() -> None:
    model = tiny()
    model.eval()
    imgs = images(model)
    calls = []
    handle = model.decoder_embed.register_forward_hook(lambda *a: calls.append(1))
    tokens = []
    handle2 = model.blocks[0].register_forward_pre_hook(lambda mod, args: tokens.append(args[0].shape))
    logits = model.classify(imgs)
    handle.remove()
    handle2.remove()
    assert calls == [] and tokens == [(4, 17, 32)]
    # Token order does not matter to attention and the mean: same as a forward without masking.
    torch.testing.assert_close(logits, model(imgs, mask_ratio=0.0).logits, rtol=1e-4, atol=1e-5)


def test_batchnorm_head_trains_on_batches_and_evaluates_on_running_stats() -> None:
    model = tiny()
    imgs = images(model, n=8)
    model(imgs)
    bn = model.cls_head[1]
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    model.eval()
    single = model.classify(imgs[:1])
    torch.testing.assert_close(single, model.classify(imgs)[:1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- attention and compilation

def _step(model: nn.Module, imgs: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
    out = model(imgs, mask_ratio=0.75, noise=noise)
    total, _, _ = supmae_loss(out, labels)
    total.backward()
    return [total.detach(), out.pred.detach(), out.logits.detach()]


def _pair(**kw) -> tuple[SupMAE, SupMAE]:
    a = tiny(**kw, attn_impl="sdpa")
    b = tiny(**kw, attn_impl="eager")
    b.load_state_dict(a.state_dict())
    return a, b


def test_sdpa_and_eager_attention_agree() -> None:
    sdpa, eager = _pair()
    assert all(blk.attn.fused_attn for blk in [*sdpa.blocks, *sdpa.decoder_blocks])
    assert not any(blk.attn.fused_attn for blk in [*eager.blocks, *eager.decoder_blocks])
    imgs, labels, noise = images(sdpa), torch.tensor([0, 1, 2, 3]), torch.rand(4, 16)
    for a, b in zip(_step(sdpa, imgs, labels, noise), _step(eager, imgs, labels, noise)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    grads_b = dict(eager.named_parameters())
    for name, p in sdpa.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_b[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_whole_training_step_compiles_without_graph_breaks() -> None:
    """fullgraph=True fails on any graph break (a host sync such as .item(), a data-dependent shape);
    the aot_eager backend traces forward and backward through AOT autograd without a C++ build, so
    this stays within seconds on a CPU. The inductor backend is exercised by the GPU test."""
    torch._dynamo.reset()
    eager, other = tiny(), tiny()
    other.load_state_dict(eager.state_dict())
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    imgs, labels, noise = images(eager), torch.tensor([0, 1, 2, 3]), torch.rand(4, 16)
    for a, b in zip(_step(eager, imgs, labels, noise), _step(compiled, imgs, labels, noise)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    grads = dict(other.named_parameters())
    for name, p in eager.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # Fresh random masks inside the compiled graph: still one graph, right shapes.
    out = compiled(imgs)
    assert out.mask.sum(1).tolist() == [12.0] * 4


@pytest.mark.gpu
def test_cuda_inductor_bf16_step_matches_eager() -> None:
    torch._dynamo.reset()
    dev = torch.device("cuda")
    sdpa, eager = _pair(img_size=32)
    sdpa, eager = sdpa.to(dev), eager.to(dev)
    compiled = torch.compile(sdpa, fullgraph=True)
    imgs = images(sdpa).to(dev)
    labels, noise = torch.tensor([0, 1, 2, 3], device=dev), torch.rand(4, 64, device=dev)
    results = []
    for model in (compiled, eager):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(_step(model, imgs, labels, noise))
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- FLOPs

def test_encoder_flops_scale_with_the_visible_fraction() -> None:
    # ViT-B/16 widths at 224 px (two encoder blocks: the ratio is per block). The count runs on a meta
    # replica, no arithmetic at all.
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16_dec512d1b", depth=2)
    masked = training_flops_per_image(model, mask_ratio=0.75)
    full = training_flops_per_image(model, mask_ratio=0.0)
    assert masked["encoder_blocks"] == pytest.approx(0.25 * full["encoder_blocks"], rel=0.05)
    # The patch embedding runs on every patch before masking (the reference's order): unchanged.
    assert masked["encoder"] - masked["encoder_blocks"] == full["encoder"] - full["encoder_blocks"] > 0
    parts = masked["encoder"] + masked["decoder"] + masked["head"]
    assert parts == pytest.approx(masked["total"], rel=0.01)
    assert masked["forward"] == pytest.approx(masked["total"] / 3, rel=0.05)  # backward ~ 2x forward
    # The head is three matmul passes (forward, input grad, weight grad) over its two Linears.
    assert masked["head"] == 3 * 2 * (768 * 3072 + 3072 * 1000)
    with torch.device("meta"):
        d8b = training_flops_per_image(create_model("mae_vit_base_patch16_dec512d8b", depth=2), mask_ratio=0.75)
    assert d8b["decoder"] > 5 * masked["decoder"]


def test_flop_counts_for_cpu_sdpa_match_eager_matmuls() -> None:
    sdpa, eager = _pair()
    imgs, noise = images(sdpa), torch.rand(4, 16)

    def fwd(model: SupMAE) -> None:
        model(imgs, noise=noise)

    # Forward only: the CPU flash kernel and the explicit matmuls do the same two products.
    assert count_flops(fwd, sdpa) == count_flops(fwd, eager)


# ---------------------------------------------------------------- user errors

def test_user_errors_are_clear() -> None:
    with pytest.raises(UserError, match="unknown model 'mae_vit_base_patch16_dec512d2b'.*did you mean"):
        create_model("mae_vit_base_patch16_dec512d2b")
    with pytest.raises(UserError, match="unknown model argument 'decoder_dept'.*decoder_depth"):
        create_model("supmae_vit_tiny_patch4", decoder_dept=2)
    with pytest.raises(UserError, match="attn_impl"):
        tiny(attn_impl="flash")
    with pytest.raises(UserError, match="multiple of patch_size"):
        tiny(img_size=18)
    with pytest.raises(UserError, match="cls_head_layers"):
        tiny(cls_head_layers=4)
    model = tiny()
    with pytest.raises(UserError, match="mask_ratio"):
        model(images(model), mask_ratio=1.0)
    with pytest.raises(UserError, match=r"\[N, 3, 16, 16\]"):
        model(torch.zeros(2, 3, 32, 32))
    with pytest.raises(UserError, match="noise must have shape"):
        model(images(model), noise=torch.rand(4, 15))
    with pytest.raises(UserError, match="no classification head"):
        tiny(cls_head_layers=0).classify(images(model))
