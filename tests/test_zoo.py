"""Tests for autofit.zoo (tiny model sizes so the file runs in a few seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from autofit import zoo

# ----------------------------------------------------------------------------- builders


def tiny_resnet(depth: int = 18, **kw) -> nn.Module:
    return zoo.resnet(depth=depth, width=8, num_classes=7, **kw)


def tiny_vit(**kw) -> nn.Module:
    cfg = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, num_classes=7)
    cfg.update(kw)
    return zoo.vit(**cfg)


def tiny_gpt(**kw) -> nn.Module:
    cfg = dict(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return zoo.gpt(**cfg)


def tiny_mlp(**kw) -> nn.Module:
    cfg = dict(in_features=3 * 8 * 8, hidden=32, depth=3, out_features=7)
    cfg.update(kw)
    return zoo.mlp(**cfg)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("hw", [(32, 32), (40, 48)])
def test_resnet_output_shape(depth: int, hw: tuple[int, int]) -> None:
    model = tiny_resnet(depth).eval()
    out = model(torch.randn(2, 3, *hw))
    assert out.shape == (2, 7)


def test_resnet_imagenet_stem_and_channels() -> None:
    model = tiny_resnet(34, small_input=False, in_channels=1, inplace=False).eval()
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model(torch.randn(2, 1, 40, 48)).shape == (2, 7)
    # CIFAR stem has no maxpool
    assert not any(isinstance(m, nn.MaxPool2d) for m in tiny_resnet(18).modules())


def test_resnet_blocks_are_flat() -> None:
    assert len(tiny_resnet(18).blocks) == 8
    assert len(tiny_resnet(50).blocks) == 16


@pytest.mark.parametrize("size", [32, 48])
def test_vit_output_shape(size: int) -> None:
    model = tiny_vit().eval()
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)


def test_vit_non_square_input_interpolates() -> None:
    model = tiny_vit().eval()
    assert model(torch.randn(1, 3, 24, 40)).shape == (1, 7)
    # the parameter itself is unchanged by the interpolation
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 32)


@pytest.mark.parametrize("T", [16, 5])
def test_gpt_output_shape(T: int) -> None:
    model = tiny_gpt().eval()
    idx = torch.randint(0, 61, (3, T))
    assert model(idx).shape == (3, T, 61)


def test_gpt_too_long_raises() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"17.*16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    idx = torch.randint(0, 61, (1, 10))
    idx2 = idx.clone()
    idx2[0, -1] = (idx[0, -1] + 1) % 61
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


def test_mlp_is_sequential_and_checkpointable() -> None:
    model = tiny_mlp()
    assert isinstance(model, nn.Sequential)
    assert isinstance(model[0], nn.Flatten)
    assert sum(isinstance(m, nn.Linear) for m in model) == 4
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 7)
    out = checkpoint_sequential(model, 2, x, use_reentrant=False)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert model[1].weight.grad is not None


def test_defaults_build() -> None:
    assert zoo.resnet()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert zoo.vit().eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert zoo.gpt()(torch.zeros(1, 128, dtype=torch.long)).shape == (1, 128, 512)
    assert zoo.mlp()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


# ----------------------------------------------------------------------------- errors


def test_bad_resnet_depth() -> None:
    with pytest.raises(ValueError, match="42") as ei:
        zoo.resnet(depth=42)
    assert "18" in str(ei.value) and "152" in str(ei.value)


def test_bad_gpt_preset() -> None:
    with pytest.raises(ValueError, match="gpt5") as ei:
        zoo.gpt(preset="gpt5")
    assert "gpt2-xl" in str(ei.value)


def test_bad_mlp_activation() -> None:
    with pytest.raises(ValueError, match="swish"):
        zoo.mlp(activation="swish")


# ----------------------------------------------------------------------------- weights / presets


def test_gpt_tied_weights() -> None:
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = tiny_gpt(tie_weights=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_gpt2_xl_param_count_on_meta() -> None:
    with torch.device("meta"):
        model = zoo.gpt(preset="gpt2-xl")
    n = sum(p.numel() for p in model.parameters())
    assert 1.4e9 < n < 1.7e9
    assert model.block_size == 1024 and model.vocab_size == 50304


def test_presets_dict() -> None:
    assert set(zoo.PRESETS) == {
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "gpt-2.7b",
        "gpt-6.7b",
    }
    with torch.device("meta"):
        n = sum(p.numel() for p in zoo.gpt(preset="gpt2").parameters())
    assert 1.2e8 < n < 1.3e8


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("build", [tiny_resnet, tiny_vit, tiny_gpt])
def test_blocks_is_modulelist(build) -> None:
    assert isinstance(build().blocks, nn.ModuleList)


class _Ckpt(nn.Module):
    """What an external wrapper does: run a segment of blocks under checkpoint."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.seg = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.seg, x, use_reentrant=False)


def _input_for(model: nn.Module) -> torch.Tensor:
    if isinstance(model, zoo.GPT):
        return torch.randint(0, model.vocab_size, (2, 8))
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("build", [tiny_resnet, tiny_vit, tiny_gpt])
def test_blocks_can_be_replaced_by_checkpointed_segments(build) -> None:
    torch.manual_seed(0)
    model = build().eval()
    x = _input_for(model)
    ref = model(x)
    blocks = list(model.blocks)
    half = len(blocks) // 2
    model.blocks = nn.ModuleList([_Ckpt(blocks[:half]), _Ckpt(blocks[half:])])
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("build", [tiny_resnet, tiny_vit, tiny_gpt, tiny_mlp])
def test_cpu_autocast(build, dtype: torch.dtype) -> None:
    model = build()
    x = _input_for(model) if not isinstance(model, nn.Sequential) else torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("build", [tiny_resnet, tiny_vit, tiny_gpt, tiny_mlp])
def test_fake_tensor_mode_forward_backward(build) -> None:
    with FakeTensorMode():
        with torch.device("cpu"):
            model = build()
            if isinstance(model, zoo.GPT):
                x = torch.randint(0, model.vocab_size, (2, 8))
            elif isinstance(model, nn.Sequential):
                x = torch.randn(2, 3, 8, 8)
            else:
                x = torch.randn(2, 3, 40, 48)  # also exercises ViT pos-emb interpolation
            out = model(x)
            out.sum().backward()
            grads = [p.grad for p in model.parameters()]
    assert out.shape[0] == 2
    assert all(g is not None for g in grads)


# ----------------------------------------------------------------------------- GRU seq2seq, conv1d audio


def tiny_seq2seq(**kw) -> nn.Module:
    cfg = dict(vocab_size=23, dim=16, num_layers=2)
    cfg.update(kw)
    return zoo.gru_seq2seq(**cfg)


def tiny_audio(**kw) -> nn.Module:
    cfg = dict(num_classes=5, width=4, stride=4, kernel=8)
    cfg.update(kw)
    return zoo.audio_conv1d(**cfg)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_seq2seq_loss_and_logits(bidirectional: bool) -> None:
    torch.manual_seed(0)
    model = tiny_seq2seq(bidirectional=bidirectional)
    src, tgt = torch.randint(0, 23, (3, 7)), torch.randint(0, 23, (3, 9))
    loss = model(src, tgt)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(src).shape == (3, 7, 23)  # the shorthand: logits for the reversed source


def test_gru_seq2seq_teacher_forcing_shifts_the_target() -> None:
    """Position t of the decoder sees target tokens before t only: changing the last target
    token changes no logit, changing the first changes every later one."""
    torch.manual_seed(0)
    model = tiny_seq2seq().eval()
    src, tgt = torch.randint(0, 23, (2, 5)), torch.randint(0, 23, (2, 6))
    seen: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    model(src, tgt)
    last = tgt.clone()
    last[:, -1] = (last[:, -1] + 1) % 23
    model(src, last)
    torch.testing.assert_close(seen[0], seen[1])
    first = tgt.clone()
    first[:, 0] = (first[:, 0] + 1) % 23
    model(src, first)
    torch.testing.assert_close(seen[0][:, :1], seen[2][:, :1])  # BOS position: unchanged
    assert not torch.allclose(seen[0][:, 1:], seen[2][:, 1:])


@pytest.mark.parametrize("samples", [None, 3000])
def test_audio_conv1d_shapes(samples: int | None) -> None:
    model = tiny_audio().eval()
    n = samples or model.min_samples
    assert model(torch.randn(2, 1, n)).shape == (2, 5)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 4
    assert zoo.audio_conv1d().min_samples == 80 + 16 * 255  # 4160: defaults take 1 s at 16 kHz


def test_seq2seq_and_audio_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bos_id"):
        zoo.gru_seq2seq(vocab_size=10, bos_id=10)
    with pytest.raises(ValueError, match="num_layers"):
        zoo.gru_seq2seq(num_layers=0)
    with pytest.raises(ValueError, match="width"):
        zoo.audio_conv1d(width=0)


def test_seq2seq_and_audio_trace_on_fake_tensors() -> None:
    with FakeTensorMode():
        with torch.device("cpu"):
            s2s = tiny_seq2seq(bidirectional=True)
            s2s(torch.randint(0, 23, (2, 4)), torch.randint(0, 23, (2, 4))).backward()
            audio = tiny_audio()
            audio(torch.randn(2, 1, 2000)).sum().backward()
            grads = [p.grad for p in [*s2s.parameters(), *audio.parameters()]]
    assert all(g is not None for g in grads)
