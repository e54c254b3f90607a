"""The permutohedral lattice and dense CRF written as pydensecrf's C++ is written: one point at a
time, a dict for its hash table, NumPy float32 scalars for its floats. The oracle of
tests/test_crf.py for more_fast.lattice (small images only: it is plain Python loops).

Transcribed from densecrf/src/permutohedral.cpp (Permutohedral::init, SSE path; seqCompute /
sseCompute), pairwise.cpp (DenseKernel, NORMALIZE_SYMMETRIC) and densecrf.cpp (inference).
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32


class ReferenceLattice:
    def __init__(self, features: np.ndarray):
        """features N x d float32."""
        n, d = features.shape
        self.n, self.d = n, d
        inv_std_dev = F32(math.sqrt(2.0 / 3.0) * (d + 1))
        scale = [F32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std_dev)) for i in range(d)]
        canonical = [[i if j <= d - i else i - (d + 1) for j in range(d + 1)] for i in range(d + 1)]
        down, up = F32(1.0) / F32(d + 1), F32(d + 1)
        table: dict[tuple, int] = {}
        self.keys: list[tuple] = []
        self.offset = np.zeros((n, d + 1), dtype=np.int64)
        self.bary = np.zeros((n, d + 1), dtype=np.float32)
        for k in range(n):
            f = features[k]
            elevated = [F32(0)] * (d + 1)
            sm = F32(0)
            for j in range(d, 0, -1):
                cf = F32(f[j - 1] * scale[j - 1])
                elevated[j] = F32(sm - F32(j) * cf)
                sm = F32(sm + cf)
            elevated[0] = sm
            rem0 = [F32(0)] * (d + 1)
            total = F32(0)
            for i in range(d + 1):
                v = F32(np.rint(F32(down * elevated[i])))  # round half to even
                rem0[i] = F32(v * up)
                total = F32(total + v)
            rank = [F32(0)] * (d + 1)
            for i in range(d):
                di = F32(elevated[i] - rem0[i])
                for j in range(i + 1, d + 1):
                    dj = F32(elevated[j] - rem0[j])
                    c = F32(1) if di < dj else F32(0)
                    rank[i] = F32(rank[i] + c)
                    rank[j] = F32(rank[j] + (F32(1) - c))
            for i in range(d + 1):
                rank[i] = F32(rank[i] + total)
                add = up if rank[i] < 0 else F32(0)
                sub = up if rank[i] >= up else F32(0)
                rank[i] = F32(rank[i] + F32(add - sub))
                rem0[i] = F32(rem0[i] + F32(add - sub))
            bary = [F32(0)] * (d + 2)
            for i in range(d + 1):
                v = F32(F32(elevated[i] - rem0[i]) * down)
                p = d - int(rank[i])
                bary[p] = F32(bary[p] + v)
                bary[p + 1] = F32(bary[p + 1] - v)
            bary[0] = F32(bary[0] + F32(F32(1) + bary[d + 1]))
            for r in range(d + 1):
                key = tuple(int(rem0[i]) + canonical[r][int(rank[i])] for i in range(d))
                if key not in table:
                    table[key] = len(self.keys)
                    self.keys.append(key)
                self.offset[k, r] = table[key]
                self.bary[k, r] = bary[r]
        self.m = len(self.keys)
        self.neighbors = np.full((d + 1, self.m, 2), -1, dtype=np.int64)
        for j in range(d + 1):
            for i, key in enumerate(self.keys):
                n1 = [c - 1 for c in key]
                n2 = [c + 1 for c in key]
                if j < d:
                    n1[j], n2[j] = key[j] + d, key[j] - d
                self.neighbors[j, i] = table.get(tuple(n1), -1), table.get(tuple(n2), -1)

    def compute(self, values: np.ndarray, reverse: bool = False) -> np.ndarray:
        """N x C float32 -> N x C: splat, blur, slice, in the C++'s order of operations."""
        n, c = values.shape
        d = self.d
        table = np.zeros((self.m + 1, c), dtype=np.float32)  # row 0: an absent neighbour
        for i in range(n):
            for j in range(d + 1):
                table[self.offset[i, j] + 1] += self.bary[i, j] * values[i]
        order = range(d, -1, -1) if reverse else range(d + 1)
        for j in order:
            new = np.zeros_like(table)
            for i in range(self.m):
                a, b = self.neighbors[j, i] + 1
                new[i + 1] = table[i + 1] + F32(0.5) * (table[a] + table[b])
            table = new
        alpha = F32(1.0) / (F32(1.0) + F32(2.0 ** -d))
        out = np.zeros((n, c), dtype=np.float32)
        for i in range(n):
            for j in range(d + 1):
                w = self.bary[i, j]
                row = table[self.offset[i, j] + 1]
                out[i] += (w * row) * alpha if c <= 2 else F32(w * alpha) * row
        return out


def reference_features(image: np.ndarray, xy: float, rgb: float | None = None) -> np.ndarray:
    """H x W x 3 uint8 -> HW x d float32 features, pixel j W + i (DenseCRF2D)."""
    h, w, _ = image.shape
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    cols = [xs.reshape(-1) / F32(xy), ys.reshape(-1) / F32(xy)]
    if rgb is not None:
        colour = image.reshape(h * w, 3).astype(np.float32)
        cols += [colour[:, k] / F32(rgb) for k in range(3)]
    return np.stack(cols, axis=1).astype(np.float32)


class ReferenceKernel:
    """NORMALIZE_SYMMETRIC: apply(Q) = n * L(n * Q), n = 1 / sqrt(L 1 + 1e-20) in double."""

    def __init__(self, features: np.ndarray):
        self.lattice = ReferenceLattice(features)
        norm = self.lattice.compute(np.ones((features.shape[0], 1), dtype=np.float32))
        self.norm = (1.0 / np.sqrt(norm.astype(np.float64) + 1e-20)).astype(np.float32)

    def apply(self, q: np.ndarray) -> np.ndarray:
        return self.lattice.compute(q * self.norm) * self.norm


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def reference_dense_crf(image: np.ndarray, probs: np.ndarray, iters: int = 10, pos_xy: float = 1.0,
                        pos_w: float = 3.0, bi_xy: float = 67.0, bi_rgb: float = 3.0, bi_w: float = 4.0) -> np.ndarray:
    """H x W x 3 uint8, C x H x W scores in [0, 1] -> C x H x W float32 marginals (densecrf.cpp inference)."""
    c, h, w = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32), 1e-5, 1.0)).reshape(c, -1).T.astype(np.float32)
    kernels = [(F32(pos_w), ReferenceKernel(reference_features(image, pos_xy))),
               (F32(bi_w), ReferenceKernel(reference_features(image, bi_xy, bi_rgb)))]
    q = _softmax(-unary)
    for _ in range(iters):
        acc = -unary
        for weight, kernel in kernels:
            acc = acc - (-weight) * kernel.apply(q)
        q = _softmax(acc)
    return q.T.reshape(c, h, w)
