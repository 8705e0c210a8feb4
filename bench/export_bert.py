"""A 6-layer BERT-style sentence encoder, written by hand in torch and exported to ONNX (plain
`torch.onnx.export`, opset 14), for bench/eval_heads.py's `--model`.

Word and position embeddings, LayerNorm, 6 post-norm layers (Linear Q/K/V, heads by
`view(B, S, heads, head_dim).transpose(1, 2)`, scores scaled by 1/sqrt(head_dim) plus the additive
attention mask, Softmax, context, transposed back and reshaped, output Linear, residual + LayerNorm,
FFN Linear-GELU(erf)-Linear, residual + LayerNorm), then mean pooling over the mask. Hidden 384, 12 heads,
FFN 1536, vocabulary 30522 (bert-base-uncased's). Initialised as BERT is (normal std 0.02, zero biases,
LayerNorm 1/0) with a fixed seed and NOT trained: its outputs mean nothing, so figures measured on it
check the mechanics of pruning, not accuracy.

    /work/venv-train/bin/python bench/export_bert.py OUT.onnx
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

VOCAB, POSITIONS, HIDDEN, HEADS, FFN, LAYERS = 30522, 512, 384, 12, 1536, 6


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.output = nn.Linear(HIDDEN, HIDDEN)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, HEADS, HIDDEN // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + additive_mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, HIDDEN)
        return self.output(context)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()  # named as in HF BERT: eval_heads.py counts heads by the name
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.intermediate = nn.Linear(HIDDEN, FFN)
        self.gelu = nn.GELU()  # erf form
        self.ffn_output = nn.Linear(FFN, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, additive_mask))
        return self.ffn_norm(x + self.ffn_output(self.gelu(self.intermediate(x))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(POSITIONS, HIDDEN)
        self.embeddings_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.embeddings_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        mask = attention_mask.to(x.dtype)
        additive_mask = (1.0 - mask[:, None, None, :]) * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        weights = mask.unsqueeze(-1)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = Encoder().eval()
    ids = torch.randint(1000, 20000, (2, 16))
    mask = torch.ones_like(ids)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(model, (ids, mask), args.out, dynamo=False, opset_version=14,
                      input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "sentence_embedding": {0: "batch"}})
    print(f"wrote {args.out}: {LAYERS} layers, {HEADS} heads, hidden {HIDDEN}, FFN {FFN} (random init, untrained)")


if __name__ == "__main__":
    main()
