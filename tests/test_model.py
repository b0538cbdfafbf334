"""Backbone, head, decoder and MSTModel on the tiny preset (real timm ViT, CPU, seconds)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

from mst_ds.config import ConfigError, DecoderConfig, HeadConfig, load_config
from mst_ds.model import Backbone, DINOHead, GlobalImageDecoder, MSTModel

B = 4


def tiny(*sets: str):
    return load_config("tiny", list(sets)).config


def views(batch: int = B, n_local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n_local)]


def _block1_input(backbone: Backbone, x, **kw) -> torch.Tensor:
    seen = {}
    h = backbone.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    backbone(x, **kw)
    h.remove()
    return seen["x"]


def test_masked_position_enters_block1_as_mask_token_plus_position_embedding():
    torch.manual_seed(0)
    bb = Backbone.from_config(tiny().model)
    x = torch.randn(2, 3, 32, 32)
    N = bb.num_patches(32)
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, [0, 5, 15]] = True
    mask[1, 7] = True
    tokens = _block1_input(bb, x, mask=mask)  # (2, 1 + N, D)
    pos = bb.vit.pos_embed[0, 1:]  # (N, D): native grid at 32 px
    patches = bb.vit.patch_embed(x).reshape(2, N, -1)
    for b, i in mask.nonzero().tolist():
        torch.testing.assert_close(tokens[b, 1 + i], bb.mask_token[0, 0] + pos[i], rtol=0, atol=1e-6)
    keep = ~mask
    torch.testing.assert_close(tokens[:, 1:][keep], (patches + pos)[keep], rtol=0, atol=1e-6)


def test_bert_random_token_takes_another_patch_embedding_with_its_own_position():
    torch.manual_seed(0)
    bb = Backbone.from_config(tiny().model)
    x = torch.randn(2, 3, 32, 32)
    N = bb.num_patches(32)
    rand = torch.zeros(2, N, dtype=torch.bool)
    rand[0, 3] = True
    source = torch.zeros(2, N, dtype=torch.long)
    source[0, 3] = N + 9  # image 1, patch 9
    tokens = _block1_input(bb, x, random_replace=rand, random_source=source)
    patches = bb.vit.patch_embed(x).reshape(2 * N, -1)
    torch.testing.assert_close(tokens[0, 1 + 3], patches[N + 9] + bb.vit.pos_embed[0, 1 + 3], rtol=0, atol=1e-6)


def test_attention_readout_equals_explicit_softmax_of_last_block():
    torch.manual_seed(0)
    bb = Backbone.from_config(tiny("model.fused_attn=true").model).eval()
    x = torch.randn(3, 3, 32, 32)
    seen = {}
    last = bb.vit.blocks[-1]
    # the last block's input = the output of the one before (the explicit path bypasses its hooks)
    h = bb.vit.blocks[-2].register_forward_hook(lambda m, args, y: seen.setdefault("x", y.detach()))
    out = bb(x, return_attn=True)
    h.remove()
    # by hand: LayerNorm → qkv → softmax(q·kᵀ/√d) per head, CLS row, patch columns
    z = last.norm1(seen["x"])
    Bz, T, D = z.shape
    heads = bb.num_heads
    d = D // heads
    qkv = z @ last.attn.qkv.weight.T + last.attn.qkv.bias
    q, k = qkv[..., :D], qkv[..., D:2 * D]
    q = q.reshape(Bz, T, heads, d).transpose(1, 2)
    k = k.reshape(Bz, T, heads, d).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    assert out.attn.shape == (3, heads, bb.num_patches(32))
    torch.testing.assert_close(out.attn, probs[:, :, 0, 1:], rtol=0, atol=1e-6)
    # the explicit path computes the same block output as timm's fused one
    ref = bb(x, return_attn=False)
    torch.testing.assert_close(out.cls, ref.cls, rtol=1e-5, atol=1e-5)
    # other blocks keep fused attention
    assert all(blk.attn.fused_attn for blk in bb.vit.blocks)


def test_global_and_local_views_and_last_n_blocks():
    bb = Backbone.from_config(tiny().model).eval()
    g = bb(torch.randn(2, 3, 32, 32), n_last_blocks=3, return_attn=True)
    loc = bb(torch.randn(2, 3, 16, 16))
    assert g.patch_tokens.shape == (2, 16, 64) and loc.patch_tokens.shape == (2, 4, 64)
    assert g.attn.shape == (2, 4, 16) and loc.attn is None
    assert ((g.attn.sum(-1) > 0) & (g.attn.sum(-1) < 1)).all()  # rows softmaxed over CLS + patches
    assert len(g.last_cls) == 3 and all(c.shape == (2, 64) for c in g.last_cls)
    torch.testing.assert_close(g.last_cls[-1], g.cls)
    assert not torch.allclose(g.last_cls[0], g.cls)


def test_timm_state_dict_loads_into_plain_timm():
    cfg = tiny().model
    bb = Backbone.from_config(cfg)
    vit = timm.create_model(cfg.arch, pretrained=False, num_classes=0, dynamic_img_size=True, **cfg.timm_kwargs)
    vit.load_state_dict(bb.timm_state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(vit.eval().forward_features(x)[:, 0], bb.eval()(x).cls)


def test_non_vit_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch"):
        Backbone.from_config(tiny("model.arch=resnet18", "model.timm_kwargs={}").model)


def test_head_weight_norm_deepcopy_and_norm_last_layer():
    cfg = HeadConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, norm_last_layer=True)
    head = DINOHead(12, cfg)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    twin = copy.deepcopy(head)
    x = torch.randn(5, 12)
    torch.testing.assert_close(head.eval()(x), twin.eval()(x))
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(32))  # rows normalised, gain 1
    assert DINOHead(12, cfg.model_copy(update={"norm_last_layer": False})).last_layer.parametrizations.weight.original0.requires_grad


def test_decoder_shapes_and_stage_check():
    dec = GlobalImageDecoder(64, 8, DecoderConfig(channels=[32, 16, 16]))
    assert dec(torch.randn(2, 16, 64)).shape == (2, 3, 32, 32)
    dec = GlobalImageDecoder(64, 8, DecoderConfig(channels=[32, 16, 16], kind="transposed_conv", use_bn=False))
    assert dec(torch.randn(2, 16, 64)).shape == (2, 3, 32, 32)
    dec = GlobalImageDecoder(384, 16, DecoderConfig())
    assert dec(torch.randn(1, 196, 384)).shape == (1, 3, 224, 224)
    with pytest.raises(ConfigError, match="decoder.channels"):
        GlobalImageDecoder(64, 8, DecoderConfig(channels=[32, 16]))


def test_teacher_gets_no_gradient_while_mask_token_head_and_decoder_do():
    torch.manual_seed(0)
    model = MSTModel.from_config(tiny("mask.prob=1.0")).train()
    teacher = model.make_teacher()
    out = model(views(), teacher, 0.04, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert model.backbone.mask_token.grad is not None and model.backbone.mask_token.grad.abs().sum() > 0
    for name, module in (("head", model.head), ("decoder", model.decoder)):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


def test_teacher_under_a_compute_dtype_runs_autocast_and_keeps_fp32_weights():
    """compute_dtype bf16: logits and attention computed in bf16 (autocast), close to the fp32 teacher's,
    weights untouched fp32; None: the fp32 forward, bit for bit the same as a teacher made without it."""
    torch.manual_seed(0)
    model = MSTModel.from_config(tiny()).train()
    fp32, low = model.make_teacher(), model.make_teacher(torch.bfloat16)
    g = views()[:2]
    ref, out = fp32(g), low(g)
    assert ref.logits[0].dtype == torch.float32 and out.logits[0].dtype == torch.bfloat16
    assert out.attn.dtype == torch.bfloat16  # (the CLS leaves a LayerNorm: autocast returns it fp32)
    assert all(p.dtype == torch.float32 for p in low.parameters())
    assert not torch.equal(out.logits[0].float(), ref.logits[0])  # it did compute in bf16
    torch.testing.assert_close(out.logits[0].float(), ref.logits[0], rtol=5e-2, atol=5e-2)
    assert torch.equal(model.make_teacher(None)(g).logits[0], ref.logits[0])
    model(views(), low, 0.04, torch.Generator().manual_seed(0))["loss"].backward()  # the step takes it


def test_make_teacher_names_subset_no_drop_path_and_a_separate_copy():
    model = MSTModel.from_config(tiny("model.drop_path_rate=0.2"))
    teacher = model.make_teacher()
    student_names = {n for n, _ in model.named_parameters()}
    assert {n for n, _ in teacher.named_parameters()} <= student_names
    probs = [m.drop_prob for m in teacher.modules() if type(m).__name__ == "DropPath"]
    assert probs and all(p == 0 for p in probs)
    assert any(m.drop_prob > 0 for m in model.modules() if type(m).__name__ == "DropPath")
    with torch.no_grad():
        model.backbone.vit.cls_token.add_(1.0)
    assert not torch.equal(model.backbone.vit.cls_token, teacher.backbone.vit.cls_token)


def test_forward_outputs_diagnostics_and_head_bn_updates_once_per_step():
    torch.manual_seed(0)
    model = MSTModel.from_config(tiny()).train()
    teacher = model.make_teacher()
    bn = model.head.mlp[1]
    out = model(views(), teacher, 0.04, torch.Generator().manual_seed(0))
    assert set(out) >= {"loss", "dino", "restore", "dino_weighted", "restore_weighted", "mask_ratio",
                        "attn_entropy", "center_norm"}
    assert out["loss"].requires_grad and all(not v.requires_grad for k, v in out.items() if k != "loss")
    torch.testing.assert_close(out["loss"].detach(), out["dino_weighted"] + out["restore_weighted"])
    torch.testing.assert_close(out["restore_weighted"], 0.6 * out["restore"])
    assert 0 < out["mask_ratio"].item() < 0.3 and 0 < out["attn_entropy"].item() <= 1
    # one head call on every crop (DINO): one BN batch, one running-statistics update per forward
    assert bn.num_batches_tracked.item() == 1
    # center_norm is the center this forward used: it moves only at the optimizer step's update
    assert out["center_norm"].item() == 0
    model.dino_loss.update_center()
    assert model(views(), teacher, 0.04, torch.Generator().manual_seed(0))["center_norm"].item() > 0


def test_dino_baseline_and_no_dino_ablation():
    torch.manual_seed(0)
    cfg = load_config("dino_deit_s_100ep").config
    base = MSTModel.from_config(tiny("mask.enabled=false", "decoder.enabled=false", "loss.restore_weight=0"))
    assert base.decoder is None and not cfg.mask.enabled and not cfg.decoder.enabled
    out = base(views(), base.make_teacher(), 0.04)
    assert out["mask_ratio"].item() == 0 and out["restore"].item() == 0
    torch.testing.assert_close(out["loss"].detach(), out["dino"])
    abl = MSTModel.from_config(tiny("loss.dino_weight=0", "mask.strategy=random", "mask.replacement=bert",
                                    "loss.restore_target=masked_patches"))
    out = abl(views(), abl.make_teacher(), 0.04, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out["loss"].detach(), out["restore_weighted"])
    assert out["dino"].item() > 0
    out["loss"].backward()  # the zero-weighted DINO branch stays in the graph: the head gets (zero) grads
    assert all(p.grad is not None for p in abl.head.parameters() if p.requires_grad)


def _dino_reference(model: MSTModel, teacher, crops: list[torch.Tensor], temp_t: float) -> torch.Tensor:
    """DINO's student side written from its published semantics (SPEC §9): MultiCropWrapper runs the
    backbone once per resolution, concatenates every crop's CLS and calls the head ONCE (one BN batch);
    DINOLoss chunks the outputs per crop and averages -q·log p over the (teacher i, student v ≠ i) pairs."""
    ncrops, B = len(crops), crops[0].shape[0]
    cls = torch.cat([model.backbone(torch.cat(crops[:2])).cls, model.backbone(torch.cat(crops[2:])).cls])
    student_out = (model.head(cls) / 0.1).chunk(ncrops)
    with torch.no_grad():
        t = teacher.head(teacher.backbone(torch.cat(crops[:2])).cls)
        q = torch.softmax((t - model.dino_loss.center) / temp_t, dim=-1).detach().chunk(2)
    total, n = 0.0, 0
    for iq, qi in enumerate(q):
        for v in range(ncrops):
            if v != iq:
                total = total + torch.sum(-qi * torch.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n += 1
    assert student_out[0].shape[0] == B
    return total / n


def test_student_head_sees_every_crop_in_one_bn_batch_as_dino():
    """Loss and head gradients equal DINO's one-call pattern; two calls (globals, locals) would not."""
    cfg = tiny("mask.enabled=false", "decoder.enabled=false", "loss.restore_weight=0")
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg).train()
    teacher = model.make_teacher()
    with torch.no_grad():  # a non-zero center, so centering is compared too
        model.dino_loss.center.normal_(0, 0.1)
    ref_model = copy.deepcopy(model)
    crops = views(batch=6, n_local=4, seed=3)
    out = model(crops, teacher, 0.04)
    ref = _dino_reference(ref_model, teacher, crops, 0.04)
    torch.testing.assert_close(out["dino"], ref.detach(), rtol=0, atol=1e-6)
    out["loss"].backward()
    ref.backward()
    for (name, p), q in zip(model.head.named_parameters(), ref_model.head.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    # the old pattern (a BN batch per view group) gives other logits: the comparison above can fail
    with torch.no_grad():
        cls_g = model.backbone(torch.cat(crops[:2])).cls
        cls_l = model.backbone(torch.cat(crops[2:])).cls
        one = model.head(torch.cat([cls_g, cls_l]))
        two = torch.cat([model.head(cls_g), model.head(cls_l)])
    assert (one - two).abs().max() > 1e-3
