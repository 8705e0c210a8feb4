"""Zeroed weights held through fine-tuning, and Dynamic Network Surgery's splicing (Guo, Yao & Chen 2016).

onnxruntime-training's AdamW moves every element of a trainable tensor, zeros too. `HeldWeights` re-applies
each weight's keep mask after every optimizer step through the checkpoint's parameters (read, multiply,
write back), so a pruned weight leaves each step exactly zero.

With splicing, each masked tensor also has a dense *shadow* W that the steps update in full: the
optimizer's change to the applied weights W*T (its gradient is that of W*T, as in the paper) is added to
W, pruned entries included, and the mask T is re-cut from |W| after each step by the paper's two
thresholds: below a_k = 0.9 (mu_k + c_k sigma_k) a weight goes, above b_k = 1.1 (mu_k + c_k sigma_k) it
comes back, in between it stays as it was (mu_k, sigma_k: mean and standard deviation of the layer's |W|,
recomputed each step). c_k is set once per layer so that mu_k + c_k sigma_k is the magnitude at the
layer's sparsity when fine-tuning starts; the pruned entries' shadow starts at their values before the
pruning step (the dense weights), so a weight the pruning step dropped but training needs can return.
"""

from __future__ import annotations

import numpy as np

LOWER, UPPER = 0.9, 1.1  # the paper's a_k and b_k as factors of mu_k + c_k sigma_k


def threshold_factor(shadow: np.ndarray, sparsity: float) -> float:
    """c such that mean(|W|) + c std(|W|) is the magnitude below which `sparsity` of |W| lies."""
    magnitude = np.abs(shadow)
    spread = float(magnitude.std())
    if spread == 0.0:
        return 0.0
    return (float(np.quantile(magnitude, sparsity)) - float(magnitude.mean())) / spread


def thresholds(shadow: np.ndarray, factor: float) -> tuple[float, float]:
    """(a, b): the lower and upper magnitude thresholds of the layer now."""
    magnitude = np.abs(shadow)
    centre = max(float(magnitude.mean()) + factor * float(magnitude.std()), 0.0)
    return LOWER * centre, UPPER * centre


def splice(shadow: np.ndarray, keep: np.ndarray, factor: float) -> np.ndarray:
    """The new keep mask: weights with |W| < a go, |W| > b come back, the rest keep their state."""
    lower, upper = thresholds(shadow, factor)
    magnitude = np.abs(shadow)
    return (magnitude > upper) | (keep & (magnitude >= lower))


class HeldWeights:
    """The masks of the named parameters of a checkpoint (`parameters`: name -> object with a numpy `data`
    property, as onnxruntime-training's `CheckpointState.parameters`), re-applied by `after_step`.
    `dense`: with splicing, per name the weights before pruning (the pruned entries' starting shadow)."""

    def __init__(self, parameters, names: list[str], dense: dict[str, np.ndarray] | None = None):
        self.parameters = parameters
        self.applied = {name: np.array(parameters[name].data, copy=True) for name in names}
        self.keep = {name: values != 0 for name, values in self.applied.items()}
        self.splicing = dense is not None
        self.shadow, self.factor = {}, {}
        if self.splicing:
            for name, values in self.applied.items():
                start = dense.get(name, values).reshape(values.shape).astype(values.dtype)
                self.shadow[name] = np.where(self.keep[name], values, start)
                self.factor[name] = threshold_factor(self.shadow[name], 1.0 - float(self.keep[name].mean()))

    def after_step(self) -> None:
        for name, applied in self.applied.items():
            stepped = np.array(self.parameters[name].data, copy=True)
            if self.splicing:
                self.shadow[name] += stepped - applied
                self.keep[name] = splice(self.shadow[name], self.keep[name], self.factor[name])
                stepped = self.shadow[name]
            self.applied[name] = np.where(self.keep[name], stepped, 0).astype(applied.dtype)
            self.parameters[name].data = self.applied[name]

    def summary(self) -> dict:
        """Weights held and zero now, over all masked tensors."""
        total = sum(k.size for k in self.keep.values())
        zeros = sum(int(k.size - k.sum()) for k in self.keep.values())
        return {"masked_tensors": len(self.keep), "weights": int(total), "zeros": int(zeros),
                "splicing": self.splicing}
