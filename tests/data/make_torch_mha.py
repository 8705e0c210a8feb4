"""Writes torch_mha.onnx beside this file: torch's nn.MultiheadAttention (its packed in_proj, as torchvision's
ViT has it) between two Linear layers, exported by torch.onnx (opset 17, dynamo=False). Needs torch
(`pip install torch==2.13.0`); the tests read the file it wrote, not torch."""

from pathlib import Path

import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a)


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.backends.mha.set_fastpath_enabled(False)
    torch.onnx.export(Block().eval(), torch.randn(1, 10, 16), Path(__file__).with_name("torch_mha.onnx"),
                      opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
