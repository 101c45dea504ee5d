"""The demo's model: a small decoder-only transformer, its synthetic data, and
greedy generation with a checksum over the exact logits bytes.

Imported by the trainer (``demo_trainer.py``, every torchrun rank) and by each
inference worker (``demo_server.py``). Both sides build the model from the same
preset name and run the same :func:`greedy_generate`, so the server's answer for
a prompt can be compared bit for bit with the trainer's own forward pass.

Bit-exactness across processes needs the same kernels on the same shapes:
:func:`set_deterministic` (one thread, deterministic algorithms, no TF32) is
called by every process that runs the model, and generation recomputes the
whole sequence each step (no KV cache) so the trainer and the server multiply
matrices of identical shapes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PRESETS",
    "PROMPT",
    "DecoderLM",
    "ModelConfig",
    "build_model",
    "greedy_generate",
    "set_deterministic",
    "synthetic_batch",
    "tensor_sha256",
    "weights_sha256",
]

PROMPT = [3, 141, 59, 26, 5, 35, 89, 79]
"""The fixed prompt both sides generate from (token ids < every preset's vocab)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder. Trainer and server must use the same preset."""

    vocab: int
    dim: int
    layers: int
    heads: int
    ffn: int
    max_seq: int
    batch: int
    """Sequences per trainer rank per step."""
    seq: int
    """Training sequence length."""
    new_tokens: int
    """Tokens the demo generates from :data:`PROMPT` after every step."""


PRESETS = {
    # About 4.2 M parameters (16.9 MB of float32): a few seconds a step on 2 cores.
    "small": ModelConfig(vocab=4096, dim=256, layers=4, heads=8, ffn=1024, max_seq=128, batch=8, seq=64, new_tokens=16),
    # About 0.12 M parameters, for CI.
    "tiny": ModelConfig(vocab=256, dim=64, layers=2, heads=4, ffn=256, max_seq=64, batch=4, seq=32, new_tokens=8),
}


def set_deterministic(device: torch.device | str = "cpu") -> None:
    """Make matmuls reproducible across processes: one CPU thread, deterministic
    kernels, no TF32. Call in every process that runs the model, before it does.

    ``CUBLAS_WORKSPACE_CONFIG`` must be in the environment before CUDA starts;
    ``demo.py`` sets it for every child, and this sets it as a fallback.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head attention and a GELU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = nn.LayerNorm(cfg.dim)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=True)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        # Plain matmul attention rather than scaled_dot_product_attention: its
        # backend choice (flash, efficient, math) depends on the machine, and
        # the plain form is deterministic on CPU and GPU alike.
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        x = x + self.o_proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(x))))


class DecoderLM(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm, and
    an output head tied to the token embedding (so ``tok_emb.weight`` is sent once)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for token ids ``[batch, seq]``."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.tok_emb.weight)


def build_model(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> DecoderLM:
    """The preset's model, initialized on the CPU from ``seed`` (so every device
    starts from the same bytes), then moved to ``device``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DecoderLM(PRESETS[preset])
        for name, p in model.named_parameters():
            if name.endswith("_emb.weight"):
                nn.init.normal_(p, std=0.02)
    return model.to(device)


def synthetic_batch(cfg: ModelConfig, step: int, rank: int, device: torch.device | str) -> torch.Tensor:
    """Token sequences ``[batch, seq + 1]`` for one rank and step, from a fixed seed.

    A toy language over a quarter of the vocabulary: each token is usually a
    fixed function of the one before it (a successor table shared by all
    ranks), sometimes a random word, so the loss falls visibly within a few steps.
    """
    words = cfg.vocab // 4
    table = torch.randperm(words, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(10_000 * (step + 1) + rank)
    seqs = torch.empty(cfg.batch, cfg.seq + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(words, (cfg.batch,), generator=gen)
    noise = torch.rand(cfg.batch, cfg.seq, generator=gen) < 0.2
    random_words = torch.randint(words, (cfg.batch, cfg.seq), generator=gen)
    for t in range(cfg.seq):
        seqs[:, t + 1] = torch.where(noise[:, t], random_words[:, t], table[seqs[:, t]])
    return seqs.to(device)


def tensor_sha256(tensors: list[torch.Tensor]) -> str:
    """sha256 over the exact row-major bytes of ``tensors`` (no numpy needed)."""
    h = hashlib.sha256()
    for t in tensors:
        host = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        h.update(ctypes.string_at(host.data_ptr(), host.numel()))
    return h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 over every parameter's name and bytes, in ``named_parameters`` order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(bytes.fromhex(tensor_sha256([p])))
    return h.hexdigest()


@torch.no_grad()
def greedy_generate(model: DecoderLM, prompt: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens after ``prompt`` and the sha256 of every step's last-position
    logits (float bytes, in order). Recomputes the full sequence each step."""
    if not prompt or max_new_tokens < 0 or len(prompt) + max_new_tokens > model.cfg.max_seq:
        raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens must fit in "
                         f"max_seq={model.cfg.max_seq} (and the prompt must not be empty)")  # fmt: skip
    if any(not isinstance(i, int) or not 0 <= i < model.cfg.vocab for i in prompt):
        raise ValueError(f"prompt token ids must be ints in [0, {model.cfg.vocab})")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    steps = []
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1, :]
        steps.append(logits)
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    model.train(was_training)
    return ids[0, len(prompt):].tolist(), tensor_sha256(steps)
