"""Train a tiny causal transformer whose attention is attn_ops.MultiheadAttention, next to the same
model (same initial weights, same batches) on torch.nn.MultiheadAttention, and print both losses.

    python examples/train_tiny_transformer.py

On CPU the op runs its PyTorch reference; on a CUDA GPU, the fused Triton kernels. The task is
copying: each sequence is random tokens followed by the same tokens again; the loss is taken on the
second half, which attention can learn to predict by looking back (it starts at about log(32) = 3.47).
Both columns should agree to about 1e-5 per step: the models differ only in their attention.
"""

import torch
import torch.nn.functional as F

import attn_ops

VOCAB, HALF, EMBED, HEADS, LAYERS, BATCH, STEPS = 32, 16, 64, 4, 2, 16, 60


class Block(torch.nn.Module):
    def __init__(self, attention_class):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(EMBED)
        self.attn = attention_class(EMBED, HEADS, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(EMBED)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(EMBED, 4 * EMBED), torch.nn.GELU(), torch.nn.Linear(4 * EMBED, EMBED)
        )

    def forward(self, x, causal_mask):
        h = self.norm1(x)
        # is_causal=True with need_weights=False: both modules use their attention's causal rule.
        x = x + self.attn(h, h, h, attn_mask=causal_mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(torch.nn.Module):
    def __init__(self, attention_class):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.position = torch.nn.Parameter(torch.randn(2 * HALF, EMBED) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(attention_class) for _ in range(LAYERS))
        self.head = torch.nn.Linear(EMBED, VOCAB)

    def forward(self, tokens):
        length = tokens.shape[1]
        causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.embed(tokens) + self.position[:length]
        for block in self.blocks:
            x = block(x, causal_mask)
        return self.head(x)


def copy_batch(generator, device):
    first = torch.randint(VOCAB, (BATCH, HALF), generator=generator).to(device)
    return torch.cat([first, first], dim=1)


def train(models, steps, device, log=None):
    """Trains each model on the same batches; returns each step's losses, one list per model."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in models]
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        tokens = copy_batch(generator, device)
        losses = []
        for model, optimizer in zip(models, optimizers):
            logits = model(tokens[:, :-1])
            # Only the second half is predictable: the first half is random.
            loss = F.cross_entropy(logits[:, HALF - 1 :].reshape(-1, VOCAB), tokens[:, HALF:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(losses)
        if log:
            log(step, losses)
    return history


def twin_models(device):
    """attn_ops and torch models with identical weights (our module loads torch's state_dict)."""
    torch.manual_seed(0)
    reference = TinyTransformer(torch.nn.MultiheadAttention).to(device)
    ours = TinyTransformer(attn_ops.MultiheadAttention).to(device)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device} (attn_ops runs {'its Triton kernels' if device == 'cuda' else 'its reference'})")
    print(f"{'step':>4}  {'attn_ops loss':>13}  {'torch loss':>10}")

    def log(step, losses):
        if step % 10 == 0 or step == STEPS - 1:
            print(f"{step:>4}  {losses[0]:>13.4f}  {losses[1]:>10.4f}")

    train(twin_models(device), STEPS, device, log)


if __name__ == "__main__":
    main()
