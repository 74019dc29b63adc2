"""``cdr``: a convection-diffusion-reaction PDE surrogate (parameters → sensor readings).

In the spirit of the CDR experiment of Newman et al., "Train Like a (Var)Pro" (GNvpro):
each sample is one PDE solve, the input its 55 parameters, the target the solution at 72
sensors. Solved with finite differences and a sparse direct solve (scipy), deterministic
in the options, cached on disk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from curvkit.options import option
from curvkit.tasks.base import DatasetPart

if TYPE_CHECKING:
    import scipy.sparse as sp

# scipy is imported in the functions that assemble or solve a PDE, not with the module:
# the registry imports every task, and scipy added ~22 MiB of resident memory to every
# process that builds an optimizer

NUM_PARAMS = 55
NUM_SENSORS = 72
_MODES = [(a, b) for a in range(5) for b in range(5)]            # 25 diffusivity modes
_CENTERS = [((i + 1) / 6, (j + 1) / 6) for i in range(5) for j in range(5)]  # 25 sources
_SENSORS_X1 = np.linspace(0.1, 0.9, 9)
_SENSORS_X2 = np.linspace(0.1, 0.9, 8)


def _mode_basis(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """(points, 25): the log-diffusivity modes cos(πa x1) cos(πb x2) / (2(1 + a + b))."""
    return np.stack([0.5 / (1 + a + b) * np.cos(np.pi * a * x1) * np.cos(np.pi * b * x2)
                     for a, b in _MODES], axis=-1)


def _source_basis(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """(points, 25): Gaussian bumps of width 0.08 on the 5×5 source lattice."""
    return np.stack([np.exp(-((x1 - c1) ** 2 + (x2 - c2) ** 2) / (2 * 0.08**2))
                     for c1, c2 in _CENTERS], axis=-1)


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> dict:
    """Everything about the n×n discretisation that does not depend on the parameters:
    node coordinates, mode bases at the four face midpoints of every node, the source
    basis, and the fixed sparsity pattern (COO order → CSC order of the data array)."""
    import scipy.sparse as sp

    h = 1.0 / (n + 1)
    x = h * np.arange(1, n + 1)
    X1, X2 = np.meshgrid(x, x, indexing="ij")
    idx = np.arange(n * n).reshape(n, n)
    faces, rows, cols, masks = [], [], [], []
    # neighbour (i + di, j + dj) along `axis`, face midpoint half-way towards it
    for axis, shift in ((0, -1), (0, 1), (1, -1), (1, 1)):
        f1 = X1 + (0.5 * shift * h if axis == 0 else 0.0)
        f2 = X2 + (0.5 * shift * h if axis == 1 else 0.0)
        faces.append((axis, shift, _mode_basis(f1, f2).reshape(n * n, -1)))
        src = [slice(None), slice(None)]
        dst = [slice(None), slice(None)]
        src[axis] = slice(max(-shift, 0), n - max(shift, 0))
        dst[axis] = slice(max(shift, 0), n - max(-shift, 0))
        mask = np.zeros((n, n), bool)
        mask[tuple(src)] = True
        masks.append(mask.ravel())
        rows.append(idx[tuple(src)].ravel())
        cols.append(idx[tuple(dst)].ravel())
    rows.append(idx.ravel())
    cols.append(idx.ravel())
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    order = sp.coo_matrix((np.arange(len(rows_a), dtype=np.float64), (rows_a, cols_a)),
                          shape=(n * n, n * n)).tocsc()
    return {"h": h, "X1": X1.ravel(), "X2": X2.ravel(), "faces": faces, "masks": masks,
            "source": _source_basis(X1.ravel(), X2.ravel()),
            "perm": order.data.astype(np.int64), "indices": order.indices,
            "indptr": order.indptr, "n": n}


def assemble(y: np.ndarray, n: int, kappa0: float = 0.05) -> tuple[sp.csc_matrix, np.ndarray]:
    """The discrete operator A and right-hand side s of the PDE for parameters ``y`` (55,).

    −∇·(κ∇u) + v·∇u + r u = s on (0, 1)², u = 0 on the boundary, on n×n interior nodes
    (spacing h = 1/(n+1), unknown k = i·n + j for node (x1_i, x2_j)). Diffusion: the
    five-point flux form with κ evaluated at the face midpoints; convection: first-order
    upwind (A stays an M-matrix, so the discrete maximum principle holds for any Péclet
    number); reaction on the diagonal. Parameters:

    * y[0:25]: log κ = log κ0 + Σ_ab y_ab · cos(πa x1) cos(πb x2) / (2(1 + a + b)),
    * y[25:50]: amplitudes of 25 Gaussian sources (width 0.08) on a 5×5 lattice,
    * y[50:52]: the constant velocity v,  y[52]: the reaction rate r = exp(y52),
    * y[53:55]: the position (0.5 + 0.3 y53, 0.5 + 0.3 y54) of a strong source (width 0.05).
    """
    import scipy.sparse as sp

    g = _grid(n)
    h = g["h"]
    diag = np.full(n * n, np.exp(y[52]))
    offdiag = []
    for (axis, shift, basis), mask in zip(g["faces"], g["masks"]):
        a = kappa0 * np.exp(basis @ y[:25]) / h**2
        # upwind: the upstream neighbour's coefficient gains |v|/h (and so does the node)
        a = a + max(-shift * y[50 + axis], 0.0) / h
        diag += a
        offdiag.append(-a[mask])
    data = np.concatenate([*offdiag, diag])[g["perm"]]
    A = sp.csc_matrix((data, g["indices"], g["indptr"]), shape=(n * n, n * n))
    p1, p2 = 0.5 + 0.3 * y[53], 0.5 + 0.3 * y[54]
    s = g["source"] @ y[25:50] + 5.0 * np.exp(
        -((g["X1"] - p1) ** 2 + (g["X2"] - p2) ** 2) / (2 * 0.05**2))
    return A, s


def sensor_matrix(n: int) -> sp.csr_matrix:
    """Bilinear interpolation (72, n²) from interior nodes to the 9×8 sensor lattice;
    the zero boundary values enter as zeros."""
    import scipy.sparse as sp

    h = 1.0 / (n + 1)
    rows, cols, vals = [], [], []
    r = 0
    for s1 in _SENSORS_X1:
        for s2 in _SENSORS_X2:
            g1, g2 = s1 / h, s2 / h            # grid coordinates; node i sits at i + 1
            i0, j0 = int(np.floor(g1)), int(np.floor(g2))
            t1, t2 = g1 - i0, g2 - j0
            for di, w1 in ((0, 1 - t1), (1, t1)):
                for dj, w2 in ((0, 1 - t2), (1, t2)):
                    i, j = i0 + di - 1, j0 + dj - 1
                    if 0 <= i < n and 0 <= j < n and w1 * w2 != 0:
                        rows.append(r)
                        cols.append(i * n + j)
                        vals.append(w1 * w2)
            r += 1
    return sp.csr_matrix((vals, (rows, cols)), shape=(NUM_SENSORS, n * n))


def solve(y: np.ndarray, n: int, kappa0: float = 0.05) -> np.ndarray:
    """The discrete solution u (n, n) for parameters ``y``."""
    import scipy.sparse.linalg as spla

    A, s = assemble(y, n, kappa0)
    return spla.spsolve(A, s).reshape(n, n)


class CdrDataset(DatasetPart):
    """Convection-diffusion-reaction surrogate: 55 PDE parameters → 72 sensor values (MSE).

    Each sample draws parameters y ~ U[−1, 1]^55 (``numpy.random.default_rng(seed)``),
    solves −∇·(κ∇u) + v·∇u + r u = s on the unit square (zero Dirichlet boundary, ``grid``²
    interior nodes, upwind finite differences, sparse LU) and reads u at a 9×8 lattice of
    sensors by bilinear interpolation. The map is linear in the 25 source amplitudes and
    nonlinear in the 25 log-diffusivity modes, the velocity, the reaction rate and the
    position of a moving source (see :func:`assemble`). Sizes follow the GNvpro paper's CDR
    set: 400 / 200 / 200 samples. Targets are standardised per sensor with the training
    mean and standard deviation (``standardize``); optional Gaussian ``noise`` is added
    before that, relative to each sensor's training standard deviation.
    """

    name = "cdr"
    loss = "mse"
    cached = True

    @dataclass
    class Options:
        n_train: int = option(400, "training samples", min=1)
        n_val: int = option(200, "validation samples", min=0)
        n_test: int = option(200, "test samples", min=1)
        grid: int = option(35, "interior grid nodes per dimension", min=8, max=200)
        noise: float = option(0.0, "observation noise, relative to each sensor's std", min=0.0)
        standardize: bool = option(True, "standardise targets with training mean and std")
        seed: int = option(0, "seed of the parameter draws and the noise")

    def generate(self) -> dict[str, np.ndarray]:
        o = self.options
        rng = np.random.default_rng(o.seed)
        total = o.n_train + o.n_val + o.n_test
        ys = rng.uniform(-1.0, 1.0, size=(total, NUM_PARAMS))
        P = sensor_matrix(o.grid)
        obs = np.stack([P @ solve(y, o.grid).ravel() for y in ys])
        std = obs[:o.n_train].std(axis=0) + 1e-12
        if o.noise > 0:
            obs = obs + o.noise * std * rng.standard_normal(obs.shape)
        if o.standardize:
            obs = (obs - obs[:o.n_train].mean(axis=0)) / (obs[:o.n_train].std(axis=0) + 1e-12)
        a, b = o.n_train, o.n_train + o.n_val
        return {"x_train": ys[:a], "y_train": obs[:a], "x_val": ys[a:b], "y_val": obs[a:b],
                "x_test": ys[b:], "y_test": obs[b:]}
