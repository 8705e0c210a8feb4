"""Writes beside this file torch's nn.MultiheadAttention (its packed in_proj, as torchvision's ViT has it)
between two Linear layers, exported by torch.onnx (opset 17, dynamo=False): torch_mha.onnx with static
shapes, torch_mha_dynamic.onnx with a dynamic batch (every size of the attention then computed from
shapes) and torch_mha_dynamic_seq.onnx with a dynamic batch and sequence. Needs torch
(`pip install torch==2.13.0`); the tests read the files it wrote, not torch."""

from pathlib import Path

import onnx
import torch

SEQ = 10


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


def export(path: Path, batch: int, axes: dict | None = None) -> None:
    torch.manual_seed(0)
    torch.onnx.export(Block().eval(), torch.randn(batch, SEQ, 16), path, opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes=axes)


def key_length_from_shape(path: Path) -> None:
    """The tracer writes the keys' and values' length (`k.view(k.shape[0], ...)`) as the constant SEQ even
    with a dynamic sequence, so the export runs only at SEQ: those entries read the queries' length
    instead, as the query view does (self-attention: the same size)."""
    model = onnx.load(path)
    nodes = {out: node for node in model.graph.node for out in node.output}
    constants = {out: onnx.numpy_helper.to_array(node.attribute[0].t).tolist()
                 for out, node in nodes.items() if node.op_type == "Constant" and node.attribute[0].name == "value"}
    views = [n for n in model.graph.node if n.op_type == "Reshape" and nodes[n.input[1]].op_type == "Concat"]
    query_length = nodes[views[1].input[1]].input[0]  # views[0] is the packed split, views[1] the queries'
    fixed = [nodes[v.input[1]] for v in views[2:4] if constants.get(nodes[v.input[1]].input[0]) == [SEQ]]
    assert query_length not in constants and len(fixed) == 2, "the export changed: check the key and value views"
    for concat in fixed:
        unused = nodes[concat.input[0]]
        concat.input[0] = query_length
        model.graph.node.remove(unused)
    onnx.checker.check_model(model)
    onnx.save(model, path)


if __name__ == "__main__":
    torch.backends.mha.set_fastpath_enabled(False)
    here = Path(__file__).parent
    export(here / "torch_mha.onnx", 1)
    export(here / "torch_mha_dynamic.onnx", 2, {"x": {0: "batch"}, "y": {0: "batch"}})
    export(here / "torch_mha_dynamic_seq.onnx", 2, {"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})
    key_length_from_shape(here / "torch_mha_dynamic_seq.onnx")
