"""Built-in model zoo, written in plain PyTorch (no torchvision / timm).

Models (all builders take plain keyword arguments with defaults):

- ``resnet``: ResNet-18/34 (BasicBlock) and ResNet-50/101/152 (Bottleneck),
  with a CIFAR stem (``small_input=True``) or an ImageNet stem.
- ``vit``: Vision Transformer with a cls token, pre-norm blocks, SDPA attention
  and a learned position embedding that is interpolated on the fly when the
  input resolution differs from ``image_size``.
- ``gpt``: nanoGPT-style causal decoder (SDPA, ``is_causal=True``), with
  ``PRESETS`` for GPT-2 (124M) up to a 6.7B configuration.
- ``lstm_lm``: an LSTM/GRU language model (its CPU kernel's workspace is invisible to
  fake tensors; ``autofit.predict.calibrate`` corrects it from a probe).
- ``gru_seq2seq``: a GRU encoder-decoder (teacher forcing, token cross-entropy).
- ``audio_conv1d``: an M5-style 1-D conv net on raw waveforms ``(B, 1, samples)``.
- ``mlp``: a plain ``nn.Sequential`` MLP, usable directly with
  ``torch.utils.checkpoint.checkpoint_sequential``.

Conventions relied on by the rest of ``autofit``:

- ResNet, ViT and GPT keep their repeated blocks in ``self.blocks``
  (an ``nn.ModuleList``) and apply them as ``for blk in self.blocks: x = blk(x)``
  so a wrapper can swap ``model.blocks`` for checkpointed segments.
- ``forward`` has no data-dependent Python control flow, so every model can be
  traced under ``torch._subclasses.FakeTensorMode``; weight init uses only
  ``nn.init`` functions so construction works under fake / meta devices too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PRESETS",
    "RESNET_DEPTHS",
    "GPT",
    "ResNet",
    "ViT",
    "gpt",
    "audio_conv1d",
    "gru_seq2seq",
    "lstm_lm",
    "mlp",
    "resnet",
    "vit",
]


# -----------------------------------------------------------------------------
# ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity / 1x1-projection shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, inplace: bool = True) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, planes, H/s, W/s)
        out = out + self.shortcut(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, ResNet v1.5) -> 1x1 bottleneck block (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, inplace: bool = True) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4*planes, H/s, W/s)
        out = out + self.shortcut(x)
        return self.relu(out)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 conv + BN projection."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


# depth -> (block type, blocks per stage)
RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet: stem -> flat ``blocks`` (all stages) -> global avg pool -> fc."""

    def __init__(
        self,
        depth: int = 18,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        small_input: bool = True,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(
                f"unsupported ResNet depth {depth!r}; allowed depths: {sorted(RESNET_DEPTHS)}"
            )
        block, counts = RESNET_DEPTHS[depth]
        self.depth = depth
        if small_input:  # CIFAR stem: 3x3 conv, stride 1, no maxpool
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=inplace),
            )
        else:  # ImageNet stem: 7x7 conv stride 2 + 3x3 maxpool stride 2
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=inplace),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        blocks: list[nn.Module] = []
        in_planes = width
        for stage, n in enumerate(counts):
            planes = width * (2**stage)
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(block(in_planes, planes, stride=stride, inplace=inplace))
                in_planes = planes * block.expansion
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, width, H', W')
        for blk in self.blocks:
            x = blk(x)  # (B, C_stage, H_stage, W_stage)
        x = self.pool(x).flatten(1)  # (B, num_features)
        return self.fc(x)  # (B, num_classes)


def resnet(
    depth: int = 18,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    small_input: bool = True,
    inplace: bool = True,
) -> nn.Module:
    """Build a ResNet of ``depth`` in {18, 34, 50, 101, 152}; any input H, W works."""
    return ResNet(
        depth=depth,
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        small_input=small_input,
        inplace=inplace,
    )


# -----------------------------------------------------------------------------
# Transformer pieces shared by ViT and GPT


class SelfAttention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"embedding dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)  # fused q, k, v
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, time (tokens), channels
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.heads
        q = q.view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.c_fc(x))  # (B, T, hidden)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, bias=bias)
        self.attn = SelfAttention(dim, heads, dropout=dropout, bias=bias, causal=causal)
        self.ln_2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


def _init_transformer(module: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue  # biases / LayerNorm / handled by the module loop below
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer))
        else:
            nn.init.normal_(p, mean=0.0, std=std)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# ViT


class ViT(nn.Module):
    """Vision Transformer with cls token and resolution-adaptive pos embedding."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        n_patches = self.grid_size * self.grid_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        _init_transformer(self, n_layer=max(depth, 1))
        nn.init.zeros_(self.head.weight)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position embedding for a (gh, gw) patch grid, bilinearly resized if needed."""
        if gh == self.grid_size and gw == self.grid_size:
            return self.pos_embed  # (1, 1+N, C)
        g, C = self.grid_size, self.pos_embed.size(-1)
        cls_pos = self.pos_embed[:, :1]  # (1, 1, C)
        patch_pos = self.pos_embed[:, 1:].reshape(1, g, g, C).permute(0, 3, 1, 2)  # (1, C, g, g)
        patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bilinear", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, C)  # (1, gh*gw, C)
        return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1+gh*gw, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, C, gh, gw)
        B, C, gh, gw = x.shape  # batch, channels, grid height, grid width
        x = x.flatten(2).transpose(1, 2)  # (B, N, C) with N = gh*gw
        cls = self.cls_token.expand(B, -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, C)
        x = self.drop(x + self._pos_embed(gh, gw))  # (B, 1+N, C)
        for blk in self.blocks:
            x = blk(x)  # (B, 1+N, C)
        x = self.norm(x[:, 0])  # (B, C) cls token
        return self.head(x)  # (B, num_classes)


def vit(
    image_size: int = 32,
    patch_size: int = 4,
    in_channels: int = 3,
    num_classes: int = 10,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Build a ViT; inputs of other resolutions get an interpolated pos embedding."""
    return ViT(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
    )


# -----------------------------------------------------------------------------
# GPT


# preset -> (n_layer, n_head, n_embd); vocab_size=50304, block_size=1024
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "gpt-2.7b": dict(n_layer=32, n_head=32, n_embd=2560),  # 2.7B
    "gpt-6.7b": dict(n_layer=32, n_head=32, n_embd=4096),  # 6.7B
}
PRESET_VOCAB_SIZE = 50304  # GPT-2's 50257 padded up to a multiple of 64
PRESET_BLOCK_SIZE = 1024


class GPT(nn.Module):
    """nanoGPT-style causal decoder: (B, T) token ids -> (B, T, vocab_size) logits."""

    def __init__(
        self,
        vocab_size: int = 512,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [Block(n_embd, n_head, dropout=dropout, bias=bias, causal=True) for _ in range(n_layer)]
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        _init_transformer(self, n_layer=max(n_layer, 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()  # batch, time
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for blk in self.blocks:
            x = blk(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        return self.lm_head(x)  # (B, T, vocab_size)


def gpt(
    vocab_size: int = 512,
    block_size: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    bias: bool = True,
    tie_weights: bool = True,
    preset: str | None = None,
) -> nn.Module:
    """Build a GPT; ``preset`` (see ``PRESETS``) overrides the size arguments."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown GPT preset {preset!r}; valid presets: {list(PRESETS)}")
        cfg = PRESETS[preset]
        n_layer, n_head, n_embd = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
        vocab_size, block_size = PRESET_VOCAB_SIZE, PRESET_BLOCK_SIZE
    return GPT(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
        bias=bias,
        tie_weights=tie_weights,
    )


# -----------------------------------------------------------------------------
# MLP


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def mlp(
    in_features: int = 784,
    hidden: int = 1024,
    depth: int = 4,
    out_features: int = 10,
    activation: str = "gelu",
) -> nn.Sequential:
    """Flatten -> ``depth`` x (Linear, activation) -> Linear, as one ``nn.Sequential``."""
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; valid activations: {sorted(_ACTIVATIONS)}"
        )
    if depth < 0:
        raise ValueError(f"mlp depth must be >= 0, got {depth}")
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Flatten()]  # (B, ...) -> (B, in_features)
    d = in_features
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), act()]  # (B, hidden)
        d = hidden
    layers.append(nn.Linear(d, out_features))  # (B, out_features)
    return nn.Sequential(*layers)


# -----------------------------------------------------------------------------
# LSTM language model (a workspace-heavy op: see autofit.predict.calibrate)


class LSTMLM(nn.Module):
    """Embedding -> ``num_layers`` x LSTM (or GRU) -> Linear: logits ``(B, T, vocab_size)``."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, cell: str = "lstm") -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = rnn(dim, dim, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x, _ = self.rnn(self.embed(idx))  # (B, T, dim)
        return self.head(x)  # (B, T, vocab_size)


def lstm_lm(vocab_size: int = 2000, dim: int = 128, num_layers: int = 2,
            cell: str = "lstm") -> nn.Module:
    """An LSTM (``cell: gru`` for a GRU) language model over ``vocab_size`` tokens."""
    if cell not in ("lstm", "gru"):
        raise ValueError(f"unknown cell {cell!r}; valid cells: ['gru', 'lstm']")
    return LSTMLM(vocab_size, dim, num_layers, cell)



# -----------------------------------------------------------------------------
# GRU seq2seq (encoder GRU + decoder GRU, teacher forcing)


class GRUSeq2Seq(nn.Module):
    """Encoder GRU over ``src``; its final state starts a decoder GRU fed the target shifted
    right by one (teacher forcing: token ``bos_id`` first).

    ``forward(src, tgt)`` returns the mean token cross-entropy of the decoder's predictions
    of ``tgt`` (``loss: model`` with ``data.batch: {src: tokens, tgt: tokens}``);
    ``forward(src)`` returns logits ``(B, T, vocab_size)`` for the reversed source (the
    single-tensor shorthand with ``loss: cross_entropy``).
    """

    def __init__(self, vocab_size: int, dim: int, num_layers: int, bidirectional: bool,
                 bos_id: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.bos_id = bos_id
        self.src_embed = nn.Embedding(vocab_size, dim)
        self.tgt_embed = nn.Embedding(vocab_size, dim)
        self.encoder = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True,
                              bidirectional=bidirectional)
        self.decoder = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor | None = None) -> torch.Tensor:
        _, h = self.encoder(self.src_embed(src))  # (L * dirs, B, dim)
        if self.bidirectional:  # sum the two directions of each layer
            h = h.view(self.num_layers, 2, *h.shape[1:]).sum(1)  # (L, B, dim)
        target = src.flip(1) if tgt is None else tgt  # (B, T) ids
        bos = torch.full_like(target[:, :1], self.bos_id)  # (B, 1)
        dec_in = torch.cat([bos, target[:, :-1]], dim=1)  # (B, T): shifted right
        y, _ = self.decoder(self.tgt_embed(dec_in), h)  # (B, T, dim)
        logits = self.head(y)  # (B, T, vocab_size)
        if tgt is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))


def gru_seq2seq(vocab_size: int = 2000, dim: int = 128, num_layers: int = 2,
                bidirectional: bool = False, bos_id: int = 0) -> nn.Module:
    """A GRU encoder-decoder over ``vocab_size`` tokens (see ``GRUSeq2Seq``)."""
    if not 0 <= bos_id < vocab_size:
        raise ValueError(f"bos_id must be in [0, {vocab_size}), got {bos_id}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return GRUSeq2Seq(vocab_size, dim, num_layers, bidirectional, bos_id)


# -----------------------------------------------------------------------------
# 1-D conv audio classifier (M5-style, raw waveform)


class AudioConv1d(nn.Module):
    """M5-style classifier of raw waveforms ``(B, in_channels, samples)``: a wide strided
    first conv, then 3-tap convs, each with BatchNorm, ReLU and max-pool by 4; global average
    pool and a linear head. Any length of at least ``min_samples`` works."""

    def __init__(self, num_classes: int, in_channels: int, width: int, stride: int,
                 kernel: int, inplace: bool) -> None:
        super().__init__()
        chans = [width, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(chans):
            k, s = (kernel, stride) if i == 0 else (3, 1)
            layers += [nn.Conv1d(prev, ch, k, stride=s, padding=0 if i == 0 else 1, bias=False),
                       nn.BatchNorm1d(ch), nn.ReLU(inplace=inplace), nn.MaxPool1d(4)]
            prev = ch
        self.blocks = nn.ModuleList(
            [nn.Sequential(*layers[i:i + 4]) for i in range(0, len(layers), 4)])
        self.head = nn.Linear(prev, num_classes)
        self.min_samples = kernel + stride * (4 ** len(chans) - 1)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)  # (B, C_i, samples / (stride * 4^(i+1)))
        return self.head(x.mean(dim=2))  # (B, num_classes)


def audio_conv1d(num_classes: int = 35, in_channels: int = 1, width: int = 32,
                 stride: int = 16, kernel: int = 80, inplace: bool = True) -> nn.Module:
    """An M5-style raw-waveform classifier (Dai et al., 2017; width 128 is the paper's M5)."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("width", width), ("stride", stride), ("kernel", kernel)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return AudioConv1d(num_classes, in_channels, width, stride, kernel, inplace)
