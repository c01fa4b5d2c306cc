"""A plain-PyTorch reference of LongMem's no-memory training step, same shapes.

What ``benchmarks/train_speed.py --reference`` times beside the project's step:
no fairseq, no ALiBi, no memory. A frozen backbone of ``layers`` pre-LN GPT
blocks (d, heads, ffn; one fused q/k/v projection, GELU, biases, attention
through ``scaled_dot_product_attention(is_causal=True)``) runs forward under
``no_grad`` in eval mode; a side network of ``layers // reduction`` blocks of
the same width (dropout ``dropout`` on the attention and FFN outputs, as the
project's side layers) starts from the embedding output ``h^0`` and after side
block ``i`` adds ``h^{r(i+1)} - h^{ri}`` (the project's cross-network
residual); a trainable final LayerNorm; logits through the frozen tied
embedding (``V x d``); cross entropy; fused AdamW (CUDA) on the side's
parameters. Parameter counts equal the project's (the fused q/k/v weight is
the three projections stacked), so the same FLOPs formula applies.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def backward_and_step(loss: Tensor, opt, scaler) -> Tensor:
    """Backward, optimizer step (through ``scaler`` for fp16) and zeroed gradients;
    returns the detached loss. The project's step in ``train_speed.py`` uses it too."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


class Block(nn.Module):
    """Pre-LN GPT block: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``; x ``(B, T, d)``."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        bsz, t, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(bsz, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = self.proj(a.transpose(1, 2).reshape(bsz, t, dim))
        x = x + F.dropout(a, self.dropout, self.training)
        h = self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x + F.dropout(h, self.dropout, self.training)


class ReferenceModel(nn.Module):
    """Frozen backbone + trainable side network + frozen tied LM head (see module doc)."""

    def __init__(self, vocab: int, dim: int, heads: int, ffn: int, layers: int, reduction: int,
                 dropout: float = 0.1):
        super().__init__()
        self.reduction = reduction
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, mean=0.0, std=dim ** -0.5)  # fairseq's init
        self.backbone = nn.ModuleList(Block(dim, heads, ffn) for _ in range(layers))
        self.side = nn.ModuleList(Block(dim, heads, ffn, dropout)
                                  for _ in range(layers // reduction))
        self.side_norm = nn.LayerNorm(dim)
        self.embed.requires_grad_(False)
        self.backbone.requires_grad_(False)
        self.embed_scale = dim ** 0.5

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens ``(B, T)`` -> logits ``(B, T, V)``."""
        with torch.no_grad():
            x = self.embed_scale * self.embed(tokens)
            hiddens: List[Tensor] = [x]
            for block in self.backbone:
                x = block(x)
                hiddens.append(x)
        r = self.reduction
        x = hiddens[0]
        for i, block in enumerate(self.side):
            x = block(x) + (hiddens[r * (i + 1)] - hiddens[r * i])
        return F.linear(self.side_norm(x), self.embed.weight)


class ReferenceTrainer:
    """One training step of :class:`ReferenceModel` with the project's ``Trainer``'s
    data, autocast and optimiser settings (``step``, ``timed`` as there)."""

    def __init__(self, args, device: torch.device, dropout: float):
        self.device = device
        self.model = ReferenceModel(args.vocab, args.dim, args.heads, args.ffn, args.layers,
                                    args.reduction, dropout).to(device)
        self.model.train()
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        kw = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.98), eps=1e-6,
                                     weight_decay=0.01, **kw)
        self.scaler = (torch.amp.GradScaler(device.type) if args.dtype == "fp16" else None)
        g = torch.Generator(device=device).manual_seed(args.seed)
        shape = (4, args.batch_size, args.tokens_per_sample + 1)
        self.data = torch.randint(4, args.vocab, shape, device=device, generator=g)
        self.i = 0

    def layer_params(self):
        """(backbone, side) parameters of the blocks (embeddings and norms outside them
        excluded), as the project's FLOPs formula counts them."""
        count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        return count(self.model.backbone), count(self.model.side)

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self) -> Tensor:
        seg = self.data[self.i % self.data.size(0)]
        self.i += 1
        tokens, target = seg[:, :-1], seg[:, 1:]
        with self.autocast():
            logits = self.model(tokens)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1))
        return backward_and_step(loss, self.opt, self.scaler)
