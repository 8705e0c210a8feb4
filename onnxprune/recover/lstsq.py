"""Least-squares reconstruction of a layer (He, Zhang & Sun 2017; ThiNet, Luo et al. 2017).

The pruned layer sees inputs x (the pruned model's own activations, already recovered upstream) and
should produce the original layer's outputs y at the same point. Its weights are re-fitted by ridge
regression `min ||y - x W - b||^2 + lambda ||W - W0||^2` (W0: its current weights, so a strong ridge
means "correct the bias only"), from normal equations accumulated batch by batch
(sums of x, y, x^T x, x^T y), so memory is bounded by the feature count, not the calibration set.
Convolutions contribute a seeded sample of output positions per batch (im2col rows); grouped and
depthwise convolutions are one independent fit per group, solved together as a batch of systems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..calib.data import held_out_rows

DEFAULT_RIDGE = 1e-4  # relative to the mean input variance: keeps collinear/constant inputs finite
# Candidates, chosen per layer on held-out samples. The ridge pulls towards the layer's current weights,
# so the largest leave them as they are and only re-fit the bias (what --recover bias does).
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e3)
RIDGE_START = 4  # the grid's index the search starts from: the most chosen one (0.1)
ROWS_PER_FEATURE = 64  # sampled output positions per input feature, over the whole calibration set
MIN_ROWS = 1024  # at least, per group: a depthwise conv's 25 features took 4096 rows of its 168 groups for no
# better fit (4096 -> 1024: recovery 10-30% faster on MobileNet-style models, agreement within +-0.003; README)
MAX_BATCH_ELEMENTS = 8_000_000  # rows x features per batch (bounds the im2col buffer)
MAX_FEATURES = 8192  # per group: x^T x must fit in memory and solve in seconds
PARTS_FROM = 256  # features of a lone group from which a batch's products are three jobs (`_products`), not one
CHECK_ROWS = 256  # output rows the self-check compares, spread over the batch


@dataclass
class Update:
    """What a fit proposes for one layer, with its relative output error before and after."""

    weight: np.ndarray | None  # [groups, features, outputs per group], None: weights unchanged
    bias: np.ndarray | None  # [channels], None: bias unchanged
    error_before: float
    error_after: float
    note: str = ""
    ridge: float | None = None
    held_out: tuple[float, float] | None = None  # relative error on held-out samples, before and after
    corrected: tuple[np.ndarray, np.ndarray] | None = None  # (weight, bias) with the statistics corrected


class NormalEquations:
    """Running sums for G independent least-squares problems with D features and M outputs each. While the
    rows added are no more than half the features, they are kept too (`rows`, copies: not the caller's batch),
    and solves and residuals read them: a ridge solve is then an n x n system instead of a D x D one (with the
    kernel X X^T built per ridge, that is cheaper up to about n = D / 2). A layer that reads one row per sample (a
    classifier head after global pooling, a squeeze-excite conv) has fewer rows than features: ResNet-50's
    head, 512 features and 64 rows, solved its ridge search in 0.23 s, now in milliseconds."""

    products = np.float32  # the dtype of x^T x and x^T y per batch (`add`); the sums are float64

    def __init__(self, groups: int, features: int, outputs: int):
        self.count = 0
        self.sx = np.zeros((groups, features))
        self.sy = np.zeros((groups, outputs))
        self._xx = np.zeros((groups, features, features))  # `xx` and `xy` without the batches' means yet
        self._xy = np.zeros((groups, features, outputs))
        self._means: list[tuple[int, np.ndarray, np.ndarray]] = []  # (rows, mean x, mean y) of batches not in them
        self._split = int(features * (2 - 3 ** 0.5))  # x^T x's first block (`_products`): F x s as much work as
        # the symmetric (F - s) x (F - s) rest at s = (2 - sqrt 3) F
        self._unfilled = False  # x^T x's upper right block is behind its lower left one (`_settle`)
        self.yy = 0.0
        self.syy = np.zeros((groups, outputs))  # per output: sum of squares
        self._centered_at: tuple | None = None  # ((count, intercept), `_centered`'s arrays) once solved
        self.rows: tuple[list, list] | None = ([], [])  # x [n, G, D] and y [n, G, M] while n <= D / 2

    @property
    def xx(self) -> np.ndarray:
        """[G, D, D]: sum of x^T x."""
        self._settle()
        return self._xx

    @property
    def xy(self) -> np.ndarray:
        """[G, D, M]: sum of x^T y."""
        self._settle()
        return self._xy

    def _settle(self) -> None:
        """Put the batches' n m m^T terms (`add`) into the sums, all in one product (one per batch, an F x F
        outer product each, took a fifth of `add`'s time on ResNet-50), and copy a lone group's x^T x from its
        lower left block to the upper right one (`_products` adds only the first). Reading the sums changes
        them so: one thread at a time, after the parts of every batch added have run."""
        if self._means:
            rows = np.array([n for n, _, _ in self._means], dtype=np.float64)[:, None]  # [batches, 1]
            mean_x = np.stack([m for _, m, _ in self._means]).transpose(1, 0, 2)  # [G, batches, D]
            mean_y = np.stack([m for _, _, m in self._means]).transpose(1, 0, 2)
            weighted = (mean_x * rows).transpose(0, 2, 1)  # [G, D, batches]
            self._xx += weighted @ mean_x
            self._xy += weighted @ mean_y
            self._means = []
        if self._unfilled:
            split = self._split
            self._xx[0][:split, split:] = self._xx[0][split:, :split].T
            self._unfilled = False

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x: [rows, G, D], y: [rows, G, M]."""
        for part in self.add_parts(x, y):
            part()

    def add_parts(self, x: np.ndarray, y: np.ndarray) -> list:
        """`add`, with the products x^T x and x^T y left to the functions returned (run them all, in any order
        or side by side, before the next `add`: they write apart). They are in `products` (float32: twice as
        fast as float64 in BLAS, most of recovery's time on ResNet-50 with l1) of the batch centred on its own
        means, and go into the float64 sums as sum x x^T = sum (x - m)(x - m)^T + n m m^T: uncentred float32
        products lose a feature whose mean is far above its spread (mean 3, spread 0.03: weights 1.5% off). A
        residual from the sums has float32's floor: about 5e-8 of the targets' energy, so relative errors below
        about 1e-4 are not resolved (recovery's layers have 1e-3 and more)."""
        y = np.asarray(y, dtype=np.float64)
        rows = x.shape[0]
        self.count += rows
        sum_x, sum_y = x.sum(0, dtype=np.float64), y.sum(0)
        self.sx += sum_x
        self.sy += sum_y
        self.yy += float(np.vdot(y, y))
        self.syy += np.einsum("rgm,rgm->gm", y, y)
        if self.rows is not None and self.count > self._xx.shape[-1] // 2:
            self.rows = None
        if self.rows is not None:
            self.rows[0].append(np.array(x, dtype=np.float64))
            self.rows[1].append(y.copy())
        if not rows:
            return []
        mean_x, mean_y = sum_x / rows, sum_y / rows
        self._means.append((rows, mean_x, mean_y))
        # centred in float32 for float32 x (a float64 copy of the batch cost 25-105 ms, the product 120 ms), on the
        # mean rounded to float32: the products then carry n e e^T more, e that rounding, 1e-15 of n m m^T
        shift = mean_x.astype(np.result_type(x.dtype, self.products))
        xg = (x - shift).astype(self.products, copy=False).transpose(1, 0, 2)  # [G, rows, D]
        yg = (y - mean_y).astype(self.products).transpose(1, 0, 2)
        return self._products(xg, yg)

    def _products(self, xg: np.ndarray, yg: np.ndarray) -> list:
        """The functions adding xg^T xg and xg^T yg ([G, rows, D], [G, rows, M]) to the sums. A lone group's
        x^T x of PARTS_FROM features or more comes in two parts of about equal work: its first `_split` columns
        (a general product) and the lower right block (numpy computes a 2-D x^T x as a symmetric product, half
        a general one's work); the upper right block is the lower left's transpose (`_settle`). Cut into plain
        column blocks, the two took longer than one symmetric product. So two workers take one layer's batch
        side by side."""
        if len(xg) > 1 or xg.shape[-1] < PARTS_FROM:  # one function: batched products, or small ones
            def whole() -> None:
                if len(xg) == 1:  # (2-D: BLAS's symmetric product)
                    self._xx[0] += xg[0].T @ xg[0]
                    self._xy[0] += xg[0].T @ yg[0]
                    return
                xt = xg.transpose(0, 2, 1)
                self._xx += xt @ xg
                self._xy += xt @ yg
            return [whole]
        x, y, split = xg[0], yg[0], self._split
        self._unfilled = True

        def left() -> None:
            self._xx[0][:, :split] += x.T @ x[:, :split]

        def corner() -> None:
            rest = x[:, split:]
            self._xx[0][split:, split:] += rest.T @ rest

        def cross() -> None:
            self._xy[0] += x.T @ y
        return [left, corner, cross]

    def merged(self, other: "NormalEquations") -> "NormalEquations":
        both = NormalEquations(*self._xy.shape)
        for name in ("count", "sx", "sy", "yy", "syy"):
            setattr(both, name, getattr(self, name) + getattr(other, name))
        both._xx, both._xy = self.xx + other.xx, self.xy + other.xy
        if self.rows is not None and other.rows is not None and both.count <= both._xx.shape[-1] // 2:
            both.rows = (self.rows[0] + other.rows[0], self.rows[1] + other.rows[1])
        else:
            both.rows = None
        return both

    def solve(self, ridge: float = DEFAULT_RIDGE, intercept: bool = True,
              prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ridge solution (W [G, D, M], b [G, M]) of min ||y - x W - b||^2 + lambda ||W - prior||^2: a
        strong ridge keeps the prior weights (zero without one); the intercept is not penalised."""
        if self.rows is not None and self.count and ridge > 0:  # (ridge 0: the kernel may be singular)
            return self._solve_rows(ridge, intercept, prior)
        xx, xy, mean_x, mean_y = self._centered(intercept)
        features = xx.shape[-1]
        scale = np.trace(xx, axis1=1, axis2=2) / features
        lam = np.where(scale > 0, ridge * scale, 1.0)
        system = xx.copy()  # one F x F copy per ridge (LAPACK takes another): they cost more to allocate than to fill
        diagonal = np.arange(features)
        system[:, diagonal, diagonal] += lam[:, None]
        rhs = xy if prior is None else xy + lam[:, None, None] * prior
        try:
            weight = np.linalg.solve(system, rhs)
        except np.linalg.LinAlgError:
            weight = np.linalg.pinv(system) @ rhs
        if not np.isfinite(weight).all():
            weight = np.linalg.pinv(system) @ rhs
        bias = mean_y - np.einsum("gd,gdm->gm", mean_x, weight) if intercept else np.zeros_like(mean_y)
        return weight, bias

    def _solve_rows(self, ridge: float, intercept: bool, prior: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """`solve` from the kept rows X [n, D] (per group, centred with an intercept): with A = X^T X / n,
        (A + lambda I)^-1 (X^T Y / n + lambda P) = P + X^T (X X^T + n lambda I)^-1 (Y - X P), an n x n system
        (the push-through identity (X^T X + c I)^-1 X^T = X^T (X X^T + c I)^-1)."""
        x, y, mean_x, mean_y = self._row_arrays(intercept)
        n, features = x.shape[1], x.shape[2]
        scale = np.einsum("gnd,gnd->g", x, x) / n / features  # the trace of A over D, as `solve` scales lambda
        lam = np.where(scale > 0, ridge * scale, 1.0)
        kernel = x @ x.transpose(0, 2, 1)
        diagonal = np.arange(n)
        kernel[:, diagonal, diagonal] += n * lam[:, None]
        weight = x.transpose(0, 2, 1) @ np.linalg.solve(kernel, y if prior is None else y - x @ prior)
        if prior is not None:
            weight += prior
        bias = mean_y - np.einsum("gd,gdm->gm", mean_x, weight) if intercept else np.zeros_like(mean_y)
        return weight, bias

    def _row_arrays(self, intercept: bool):
        """The kept rows as x [G, n, D] and y [G, n, M], centred when `intercept`, with the means of x and y."""
        x = np.concatenate(self.rows[0]).transpose(1, 0, 2)
        y = np.concatenate(self.rows[1]).transpose(1, 0, 2)
        mean_x, mean_y = self.sx / self.count, self.sy / self.count
        if intercept:
            x, y = x - mean_x[:, None, :], y - mean_y[:, None, :]
        return x, y, mean_x, mean_y

    def _centered(self, intercept: bool):
        """(x^T x / n, symmetrised and with the means taken out when `intercept`, x^T y / n likewise, mean x,
        mean y), computed once per count: the ridge search solves the same sums at 4-5 ridges."""
        key = (self.count, intercept)  # rows added since: computed again
        if self._centered_at is None or self._centered_at[0] != key:
            n = max(self.count, 1)
            xx, xy = self.xx / n, self.xy / n
            mean_x, mean_y = self.sx / n, self.sy / n
            if intercept:
                xx -= mean_x[:, :, None] * mean_x[:, None, :]
                xy -= mean_x[:, :, None] * mean_y[:, None, :]
            xx += xx.transpose(0, 2, 1)  # (numpy buffers the overlapping operand)
            xx /= 2
            self._centered_at = key, (xx, xy, mean_x, mean_y)
        return self._centered_at[1]

    def release(self) -> None:
        """Drop `_centered`'s arrays (F x F per group) once the solves are done."""
        self._centered_at = None

    def residual(self, weight: np.ndarray, bias: np.ndarray) -> float:
        """sum ||y - x W - b||^2 over everything added, from the kept rows or else the running sums alone."""
        if self.rows is not None and self.count:
            x, y, _, _ = self._row_arrays(False)
            return float(np.sum(np.square(y - x @ weight - bias.reshape(len(y), 1, -1))))
        xw = self.xx @ weight  # BLAS (einsum would not use it)
        sse = (self.yy - 2 * np.sum(weight * self.xy) - 2 * np.sum(bias * self.sy) + np.sum(weight * xw)
               + 2 * np.sum(np.einsum("gd,gdm->gm", self.sx, weight) * bias) + self.count * np.sum(bias * bias))
        return max(float(sse), 0.0)

    def output_variance(self, weight: np.ndarray) -> np.ndarray:
        """[G, M]: the variance of each output of x W over the rows added, diag(W^T cov(x) W)."""
        if self.rows is not None and self.count:
            x = self._row_arrays(True)[0]
            return np.sum(np.square(x @ weight), axis=1) / self.count
        xx = self._centered(True)[0]
        return np.sum((xx @ weight) * weight, axis=1)  # BLAS (einsum would not use it)


def spread_corrected(equations: NormalEquations, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Statistics correction (OBC, Frantar & Alistarh 2022, Sec. 5; EagleEye's adaptive BatchNorm): every
    output channel of the fitted layer `x W + b` rescaled so that its mean and spread over the rows added
    equal the target's. Least squares matches the mean already but shrinks the spread towards it; a
    nonlinearity after the layer (a sigmoid score, a ReLU's threshold) may prefer the spread restored.
    Returns (weight [G, D, M], bias [G * M])."""
    n = max(equations.count, 1)
    mean_x, mean_y = equations.sx / n, equations.sy / n
    fitted_var = equations.output_variance(weight)
    target_var = np.maximum(equations.syy / n - mean_y ** 2, 0.0)
    scale = np.sqrt(np.divide(target_var, fitted_var, out=np.ones_like(fitted_var), where=fitted_var > 1e-30))
    corrected = weight * scale[:, None, :]
    return corrected, (mean_y - np.einsum("gd,gdm->gm", mean_x, corrected)).reshape(-1)


def relative(sse: float, energy: float) -> float:
    return float(np.sqrt(sse / energy)) if energy > 0 else float(np.sqrt(sse))


class LstsqFit:
    """Accumulates one layer's normal equations over calibration batches, then solves them.

    Every fifth calibration sample is held out: the ridge strength is the one of RIDGE_GRID whose fit on
    the other samples reconstructs the held-out ones best, and a fit that does not beat the current
    weights there is not used. So a layer with few rows per feature (a classifier head or a
    squeeze-excite conv sees one row per sample) is not over-fitted to the calibration set. The final
    fit, at the chosen ridge, uses every sample, or with `hold_out` only the others."""

    needs_outputs = False  # the layer's own output with its current weights: only for `self_check`

    def __init__(self, view, seed, batches: int, ridge: float | None = None, rows_per_feature: int = ROWS_PER_FEATURE,
                 hold_out: bool = False):
        self.view, self.ridge = view, ridge
        self.hold_out = hold_out  # the final fit leaves the held-out samples out too (else it uses every sample)
        groups, features, outputs = view.weight.shape
        wanted = -(-max(MIN_ROWS, rows_per_feature * features) // max(batches, 1))
        self.rows_per_batch = max(64, min(wanted, MAX_BATCH_ELEMENTS // max(features * groups, 1)))
        self.rng = np.random.default_rng(seed)
        self.fit = NormalEquations(groups, features, outputs)
        self.held = NormalEquations(groups, features, outputs)
        self.energy = np.zeros(2)  # sum of squared targets: [fit rows, held-out rows]
        self.seen = 0  # samples so far
        self.batches = 0  # batches so far
        self.check = np.zeros(2)  # [sum of squared mismatch, sum of squared outputs] of the self-check
        self.checked = False
        self.to_check: tuple | None = None  # (batch, rows, their outputs by the current weights) for `self_check`
        self.too_big = features > MAX_FEATURES

    def add(self, x: np.ndarray, y_pruned: np.ndarray | None, y_target: np.ndarray) -> None:
        """One batch: the layer's input `x`, its output with the current weights `y_pruned` (None: not
        computed; the self-check waits for `self_check`), the original's output `y_target` (its output
        positions are the layer's)."""
        for part in self.add_parts(x, y_pruned, y_target):
            part()

    def add_parts(self, x: np.ndarray, y_pruned: np.ndarray | None, y_target: np.ndarray) -> list:
        """`add`, with the normal equations' products left to the functions returned
        (`NormalEquations.add_parts`: run them all before the next batch)."""
        if self.too_big:
            return []
        view = self.view
        shape = y_target.shape
        total = view.row_count(shape)
        take = min(total, self.rows_per_batch)
        rows = np.arange(total) if take == total else np.sort(self.rng.choice(total, take, replace=False))
        held = held_out_rows(rows, total, shape[0], self.seen)
        self.seen += shape[0]
        self.batches += 1
        fit_rows = rows[~held]  # the fit's rows, then the held-out ones: two views below
        rows, split = np.concatenate([fit_rows, rows[held]]), len(fit_rows)
        features = view.features(x, shape, rows)  # as the model computes them (NormalEquations.add)
        groups, _, outputs = view.weight.shape
        target = view.outputs(y_target, rows)
        if view.out_mask is not None:
            target = target[:, view.out_mask]
        target = target.astype(np.float64)  # (after the mask: half the columns to convert at a 50% cut)
        self.energy += [np.sum(target[:split] ** 2), np.sum(target[split:] ** 2)]
        target = (target - view.offset).reshape(-1, groups, outputs)
        parts = [*self.fit.add_parts(features[:split], target[:split]),
                 *self.held.add_parts(features[split:], target[split:])]
        if not self.checked and self.to_check is None:
            some = np.linspace(0, len(rows) - 1, min(CHECK_ROWS, len(rows))).astype(np.int64)
            if np.any(features[some]):  # on the first batch whose rows there read anything
                current = (features[some].transpose(1, 0, 2) @ view.weight).transpose(1, 0, 2) + self._current_bias()
                self.to_check = self.batches - 1, rows[some], current
                if y_pruned is not None:
                    self.self_check(y_pruned)
        return parts

    def self_check(self, y_pruned: np.ndarray) -> None:
        """The current weights applied to the features of batch `to_check[0]` must give the layer's own output
        `y_pruned` on that batch (an attribute the layer view does not support fails this)."""
        _, rows, current = self.to_check
        groups, _, outputs = self.view.weight.shape
        actual = self.view.outputs(y_pruned, rows).astype(np.float64).reshape(-1, groups, outputs) - self.view.offset
        self.check += [np.sum((current - actual) ** 2), np.sum(actual * actual)]
        self.checked, self.to_check = True, None

    def _current_bias(self) -> np.ndarray:
        groups, _, outputs = self.view.weight.shape
        if self.view.bias is None:
            return np.zeros((groups, outputs))
        return self.view.bias.current.reshape(groups, outputs)

    def finish(self) -> Update:
        try:
            return self._finish()
        finally:
            self.fit.release()  # (`basis`, merged anew, goes with this call)

    def _finish(self) -> Update:
        if self.too_big:
            return Update(None, None, float("nan"), float("nan"),
                          f"skipped: {self.view.weight.shape[1]} input features per group is too many for a closed-form fit")
        mismatch = relative(self.check[0], self.check[1])
        if mismatch > 1e-3:
            return Update(None, None, float("nan"), float("nan"),
                          f"skipped: the layer's output could not be reproduced from its input (rel. error {mismatch:.2g}); "
                          "its attributes are not supported by recovery")
        intercept = self.view.bias is not None
        current = (self.view.weight, self._current_bias())
        basis = self.fit if self.hold_out else self.fit.merged(self.held)
        energy = self.energy[0] if self.hold_out else self.energy.sum()
        before = relative(basis.residual(*current), energy)
        ridge, held_before, held_after, chosen = self._choose_ridge(current, intercept)
        if basis is not self.fit:
            self.fit.release()  # its centred sums served the ridge search; the merged ones are solved now
        if held_after is not None and not held_after < held_before:
            return Update(None, None, before, before, "kept: the fit did not lower the error on held-out samples",
                          ridge=ridge, held_out=(held_before, held_before))
        # with `hold_out` the search already solved the final system (ResNet-50 with l1: one LU in 5 per layer)
        weight, bias = chosen if basis is self.fit and chosen else basis.solve(ridge, intercept, prior=self.view.weight)
        after = relative(basis.residual(weight, bias), energy)
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()) or not after < before:
            return Update(None, None, before, before, "kept: the fit did not lower the error", ridge=ridge)
        return Update(weight, bias.reshape(-1) if intercept else None, before, after, ridge=ridge,
                      held_out=(held_before, held_after) if held_after is not None else None,
                      corrected=spread_corrected(basis, weight, bias) if intercept else None)

    def _choose_ridge(self, current, intercept: bool) -> tuple[float, float | None, float | None, tuple]:
        """(ridge, held-out error of the current weights, of the best fit, the best fit's (weight, bias) on the
        fit's samples); no hold-out: a fixed ridge, and () for the fit."""
        if self.ridge is not None or self.held.count == 0 or self.fit.count == 0:
            return (self.ridge if self.ridge is not None else DEFAULT_RIDGE), None, None, ()
        energy = self.energy[1]
        prior = self.view.weight
        best = (np.inf, ())  # the lowest held-out error so far, and its fit

        def held_error(index: int) -> float:
            nonlocal best
            solved = self.fit.solve(RIDGE_GRID[index], intercept, prior)
            error = relative(self.held.residual(*solved), energy)
            if error < best[0]:
                best = error, solved
            return error

        index, scores = ridge_search(held_error, len(RIDGE_GRID))
        chosen = best[1] if best[0] == scores[index] else ()
        return RIDGE_GRID[index], relative(self.held.residual(*current), energy), scores[index], chosen


def ridge_search(error, count: int, start: int = RIDGE_START) -> tuple[int, dict[int, float]]:
    """(index of the lowest `error(index)` found, every error measured) over a grid of `count` ridges: from
    `start`, step to the better neighbour until neither is better, and measure the strongest ridge too
    (the current weights with the bias re-fitted: a second minimum, as on a layer the fit cannot improve).
    Each measurement is one LU solve (an eigendecomposition shared by all ridges was 2-3x slower than 8
    solves on 2304-4608 features); the held-out error over the grid is near-always unimodal, and the
    search measures 4-5 of its 8 ridges instead of all (311 fits of three models: 2 ended elsewhere than
    the grid's minimum, the worse by at most 1.2% held-out error)."""
    scores: dict[int, float] = {}

    def measured(index: int) -> float:
        if index not in scores:
            scores[index] = error(index)
        return scores[index]

    best = min(start, count - 1)
    while True:
        neighbours = [i for i in (best - 1, best + 1) if 0 <= i < count]
        step = min(neighbours, key=measured, default=best)
        if not measured(step) < measured(best):
            break
        best = step
    measured(count - 1)
    return min(scores, key=scores.get), scores
