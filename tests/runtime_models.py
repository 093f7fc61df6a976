"""Tiny models that together use every kind of the implementation catalogue."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KindsCNN(nn.Module):
    """conv, batch norm, ReLU, LeakyReLU, ReLU6 (hardtanh), max-pool (overlapping windows),
    adaptive average pool, dropout, residual add, tanh, sigmoid, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(32, 6)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        r = F.leaky_relu(self.bn2(self.conv2(h)), 0.1)
        h = F.relu6(h + r)
        h = self.pool(h)
        h = torch.sigmoid(torch.tanh(h))
        h = self.drop(torch.flatten(self.avg(h), 1))
        return self.fc(h)


class KindsTransformer(nn.Module):
    """layer norm, RMS norm, linear, attention, GELU, SiLU, softmax, log-softmax, dropout,
    residual add, a batched matrix product of two activations."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(width)
        self.rms = nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.gate = nn.Linear(width, width)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, 11)
        self.mix = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, C)))
        h = self.rms(x)
        x = x + self.fc2(F.gelu(self.fc1(h))) * F.silu(self.gate(h))
        scores = torch.softmax(x @ x.transpose(1, 2) / C, dim=-1)
        x = x + scores @ x
        x = x + F.log_softmax(self.mix(x) * 2.0, dim=-1)
        return F.log_softmax(self.head(x), dim=-1)


class KindsLoss(nn.Module):
    """cross-entropy with its loss inside. Over a ``[B*T, V]`` view of the logits (ignored
    targets, the mean, as a GPT's loss) the output layer, with or without its bias, is
    folded in with the loss (``linear_cross_entropy``), also with the sum and per-row
    losses; on scaled ``[N, V]`` logits with another ``ignore_index`` and per-row losses
    only log-softmax + NLL are folded (``cross_entropy``)."""

    def __init__(self, reduction: str = "mean", width: int = 16, vocab: int = 7, bias: bool = True):
        super().__init__()
        self.reduction = reduction
        self.fc = nn.Linear(width, vocab, bias=bias)
        target = torch.arange(16) % vocab
        target[3] = -100 if reduction == "mean" else 2
        target[5] = 2
        self.register_buffer("target", target)

    def forward(self, x):
        logits = self.fc(torch.tanh(x))
        rows = logits.view(-1, logits.shape[-1])
        if self.reduction == "mean":
            return F.cross_entropy(rows, self.target)
        if self.fc.bias is None:
            return F.cross_entropy(rows, self.target, reduction=self.reduction, ignore_index=2)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).contiguous() * 1.5, self.target, reduction="none", ignore_index=2)


class GRUHead(nn.Module):
    """A one-layer GRU over a short sequence and a linear head on its last output: an
    unrolled recurrent graph of many small ops."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])
