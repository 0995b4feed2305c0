"""The short demo `python -m bench` runs first: a 2-layer causal transformer on random data whose
attention is `attn_ops.attention`, checked against and timed against PyTorch's SDPA."""

import statistics

import torch
import torch.nn.functional as F
from torch import nn

import attn_ops
from bench.measure import time_cpu, time_gpu


class Block(nn.Module):
    """Pre-norm transformer block; `attend(q, k, v)` is the attention under test."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, attend):
        b, n, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).unbind(2)
        # [B, L, H, D] -> [B, H, L, D] as strided views: attn_ops takes them without a copy.
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, width))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, width, heads, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))

    def forward(self, x, attend):
        for block in self.blocks:
            x = block(x, attend)
        return x


def ours(q, k, v):
    return attn_ops.attention(q, k, v, causal=True)  # backend="auto": Triton on CUDA, else reference


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


ROUNDS = 7  # timed rounds, each a median of repeated calls of each side, alternated so drift hits both


def run():
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    batch, length, width, heads = (8, 2048, 1024, 16) if gpu else (2, 256, 256, 4)
    print(f"demo: 2-layer causal transformer, batch {batch} x {length} tokens, width {width}, "
          f"{heads} heads, {str(dtype).removeprefix('torch.')} on {device}")
    label = "attn_ops" if gpu else "attn_ops (reference)"
    if gpu:
        print("  attn_ops path: fused Triton kernels")
    else:
        print("  attn_ops path: the plain PyTorch reference (no CUDA GPU here: the fused Triton kernels "
              "need one)")
    torch.manual_seed(0)
    model = TinyTransformer(width, heads).to(device, dtype).eval()
    x = torch.randn(batch, length, width, device=device, dtype=dtype)
    timer = time_gpu if gpu else time_cpu
    ms = {"ours": [], "sdpa": []}
    with torch.no_grad():
        error = (model(x, ours).float() - model(x, sdpa).float()).abs().max().item()
        for _ in range(ROUNDS):
            for name, attend in (("ours", ours), ("sdpa", sdpa)):
                ms[name].append(timer(lambda: model(x, attend))[0])
    ratios = sorted(s / o for o, s in zip(ms["ours"], ms["sdpa"]))
    print(f"  max abs error vs SDPA: {error:.2e}")
    print(f"  forward, median of {ROUNDS} rounds: {label} {statistics.median(ms['ours']):.2f} ms, SDPA "
          f"{statistics.median(ms['sdpa']):.2f} ms; {label} at {statistics.median(ratios):.2f}x SDPA's speed "
          f"(rounds ranged {ratios[0]:.2f}x to {ratios[-1]:.2f}x)")


if __name__ == "__main__":
    run()
