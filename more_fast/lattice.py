"""The permutohedral lattice (Adams, Baek & Davis 2010) as pydensecrf builds it, in PyTorch ops on
the device of its inputs, batched over images of one size; and the dense CRF's mean field on it.

pydensecrf (densecrf/src/permutohedral.cpp, SSE path, the one every x86-64 build takes) filters
values v_n at points with features f_n in R^d by

    elevate  E f (E = the d+1 x d matrix of Adams et al., times sqrt(2/3) (d+1) / sqrt((i+1)(i+2))
             per column i, so that the lattice's blur is a Gaussian of unit std per feature);
    locate   the enclosing simplex: rem0 = (d+1) round(E f / (d+1)) (round half to even), the
             rank of each coordinate in E f - rem0, the wrap of rank and rem0 by the sum;
    splat    L[vertex_r(n)] += b_r(n) v_n for the d+1 vertices r and barycentric weights b_r(n);
    blur     for each of the d+1 lattice directions j (0..d): L <- L + 1/2 (L[key + e_j] +
             L[key - e_j]), the neighbours' keys n1 = key - 1 (all), n1_j = key_j + d, and
             n2 = key + 1, n2_j = key_j - d (an absent neighbour is 0);
    slice    out_n = sum_r b_r(n) alpha L[vertex_r(n)],  alpha = 1 / (1 + 2^-d).

Every step of the construction does the same float32 operations in the same order as the C++
(its rounding decides the simplices, so the lattice is the same one, point for point, and the
barycentric weights are bit-equal). The filter runs as sparse CSR products (splat M x P, blur
M x M per direction, slice P x M), deterministic; they sum a row in column order, which for the
blur and slice is not the C++'s order: the filtered values differ from it in the last bits
(measured relative error <= 2e-7; `lattice_filter_gather` is the bit-exact gather version).

Lattice construction: the d+1 vertex keys of every pixel, vectorized; keys packed into one int64
(mixed radix over the keys' ranges, the image index as the top digit) and deduplicated by a
stable sort and run-length; a neighbour along direction j is the packed key plus a constant, found by
searchsorted. The device-to-host reads of a build are three scalars' worth: the finite-features
check, the keys' ranges (2 d integers, the radix) and the number of lattice points (the table's
size); no per-pixel data leaves the device and no Python runs per pixel. The plain loop version of the same algorithm is more_fast/lattice_reference.py,
the oracle of the tests.

Dense CRF (densecrf.cpp's inference, NORMALIZE_SYMMETRIC, Potts): U = -log(clip(p, 1e-5, 1)),
Q = softmax(-U); each iteration Q = softmax(-U + sum_k w_k F_k(Q)), the kernels in the order
they were added (Gaussian, then bilateral), F_k(Q) = D^-1/2 L_k (D^-1/2 Q), D^-1/2 =
1 / sqrt(L_k 1 + 1e-20) (double, as pairwise.cpp), L_k the lattice filter above.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_PACKED = 2 ** 62


@dataclass
class Lattice:
    """A built lattice over P = B x N points of feature dimension d, with M lattice points.

    offsets P x (d+1) int64: the row of each vertex in the padded value table (row 0 is the
    zero row of an absent neighbour, lattice point m is row m + 1); weights P x (d+1) float32:
    the barycentric weights; neighbors (d+1) x 2 x M int64 (padded rows, 0 = absent): the n1
    and n2 neighbours of each lattice point along each direction; d; num_points M; ops: the
    same maps as CSR matrices (splat, blur per direction, slice; _sparse_operators), what
    lattice_filter runs."""
    offsets: torch.Tensor
    weights: torch.Tensor
    neighbors: torch.Tensor
    d: int
    num_points: int
    ops: dict

    @property
    def alpha(self) -> float:
        return 1.0 / (1.0 + 2.0 ** -self.d)  # float32 in the C++: 1.0f / (1 + powf(2, -d))


def _f32(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def scale_factors(d: int) -> list[float]:
    """The elevation's per-column factors, rounded as permutohedral.cpp rounds them: inv_std_dev
    = float(sqrt(2/3) (d+1)), then float(1 / sqrt((i+2)(i+1)) * inv_std_dev) in double."""
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    return [float(torch.tensor(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev, dtype=torch.float32))
            for i in range(d)]


def _locate(features: torch.Tensor):
    """P x d float32 features -> rem0 (P x (d+1), the adjusted 0-coloured vertex), rank
    (P x (d+1) int64), barycentric (P x (d+1)), all as permutohedral.cpp's SSE init computes them."""
    p, d = features.shape
    dev = features.device
    sf = _f32(scale_factors(d), dev)
    elevated = [None] * (d + 1)
    sm = torch.zeros(p, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * sf[j - 1]
        elevated[j] = sm - _f32(float(j), dev) * cf
        sm = sm + cf
    elevated[0] = sm
    elevated = torch.stack(elevated, dim=1)  # P x (d+1)
    down = _f32(1.0 / (d + 1), dev)  # 1.0f / (d+1), then float32
    up = _f32(float(d + 1), dev)
    v = torch.round(down * elevated)  # round half to even, as _mm_cvtps_epi32 / _mm_round_ps
    rem0 = v * up
    total = v.sum(dim=1, keepdim=True)  # small integers: exact in any order
    diff = elevated - rem0
    # rank_i = #{j > i: d_i < d_j} + #{j < i: not (d_j < d_i)}
    less = diff[:, :, None] < diff[:, None, :]  # [n, i, j] = d_i < d_j
    idx = torch.arange(d + 1, device=dev)
    upper = idx[None, :] > idx[:, None]  # [i, j]: j > i
    lower = idx[None, :] < idx[:, None]
    rank = (less & upper).sum(dim=2) + ((~less.transpose(1, 2)) & lower).sum(dim=2)
    rank = rank.to(torch.float32) + total
    add = torch.where(rank < 0, up, torch.zeros_like(up))
    sub = torch.where(rank >= up, up, torch.zeros_like(up))
    rank = rank + (add - sub)
    rem0 = rem0 + (add - sub)
    rank = rank.to(torch.int64)
    vals = (elevated - rem0) * down  # P x (d+1)
    # barycentric[p] = u[d-p] - u[d-p+1] (p = 1..d), barycentric[0] = u[d] + (1 - u[0]),
    # u[k] = the value of the coordinate of rank k
    u = torch.empty_like(vals).scatter_(1, rank, vals)
    bary = torch.empty_like(vals)
    bary[:, 1:] = u[:, :d].flip(1) - u[:, 1:].flip(1)
    bary[:, 0] = u[:, d] + (1.0 - u[:, 0])
    return rem0, rank, bary


def _vertex_keys(rem0: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """P x (d+1) x d int64 keys of the d+1 vertices: key_i = rem0_i + canonical[r][rank_i],
    canonical[r][j] = r if j <= d - r else r - (d+1) (the C++'s loop; _packed_vertex_keys packs
    the same keys without forming them)."""
    d = rank.shape[1] - 1
    r = torch.arange(d + 1, device=rank.device)[None, :, None]  # remainder
    rk = rank[:, None, :d]
    canon = torch.where(rk <= d - r, r, r - (d + 1))
    return rem0[:, None, :d].to(torch.int64) + canon


def _packed_vertex_keys(shifted: torch.Tensor, rank: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """P x (d+1) packed keys sum_i (key_i - lo_i) stride_i of the d+1 vertices, from `shifted` =
    corner - lo (P x d). With canonical[r][rank_i] = r - (d+1) [rank_i > d - r]:
    packed_r = sum_i shifted_i stride_i + r sum(strides) - (d+1) T_r, T_r the sum of the strides
    of the coordinates i < d of rank > d - r (a suffix sum over ranks)."""
    p, d = shifted.shape
    base = (shifted * strides).sum(dim=1, keepdim=True)  # P x 1
    by_rank = torch.zeros(p, d + 1, dtype=torch.int64, device=shifted.device)
    by_rank.scatter_(1, rank[:, :d], strides.expand(p, d))  # the stride of the coordinate of each rank
    suffix = by_rank.flip(1).cumsum(dim=1).flip(1)  # suffix[k] = sum over ranks >= k
    t = torch.cat([torch.zeros(p, 1, dtype=torch.int64, device=shifted.device), suffix[:, 1:].flip(1)], dim=1)
    r = torch.arange(d + 1, device=shifted.device)
    return base + r * strides.sum() - (d + 1) * t  # t[:, r] = suffix[d - r + 1] (r >= 1), 0 for r = 0


def build_lattice(features: torch.Tensor) -> Lattice:
    """B x N x d float32 features (one lattice per image, built together) -> Lattice over B N points."""
    if features.dim() != 3 or features.dtype != torch.float32:
        raise ValueError(f"features: expected B x N x d float32, got {tuple(features.shape)} {features.dtype}")
    b, n, d = features.shape
    if d < 1 or n < 1 or b < 1:
        raise ValueError(f"features: expected B, N, d >= 1, got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features: expected finite values")
    dev = features.device
    rem0, rank, bary = _locate(features.reshape(b * n, d))
    corner = rem0[:, :d].to(torch.int64)  # P x d: vertex r's key is corner + canonical[r][rank]
    # keys lie within corner +- d, their neighbours' within +- (2 d + 1)
    bounds = torch.cat([corner.amin(dim=0), corner.amax(dim=0)]).tolist()  # the one small host read: the radix
    lo_l = [v - (2 * d + 1) for v in bounds[:d]]
    span_l = [hi + (2 * d + 1) - lo + 1 for hi, lo in zip(bounds[d:], lo_l)]
    strides, total = [], 1
    for s in span_l:
        strides.append(total)
        total *= s
    if total * b >= MAX_PACKED:
        raise ValueError(f"features: the lattice keys span {total * b:.3g} values, more than a 62-bit key packs "
                         "(features too spread: larger sigmas, or fewer images per batch)")
    stride_t = torch.tensor(strides, dtype=torch.int64, device=dev)
    packed = _packed_vertex_keys(corner - torch.tensor(lo_l, dtype=torch.int64, device=dev), rank, stride_t)
    image = torch.arange(b, device=dev).repeat_interleave(n * (d + 1))
    packed = packed.reshape(-1) + image * total
    sorted_keys, perm = torch.sort(packed, stable=True)  # stable: a key's entries in pixel order
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    point = torch.cumsum(first, dim=0) - 1  # the lattice point of each sorted entry
    uniq = sorted_keys[first]
    m = uniq.numel()
    inverse = torch.empty_like(point)
    inverse[perm] = point
    neighbors = torch.empty(d + 1, 2, m, dtype=torch.int64, device=dev)
    me = torch.arange(m, device=dev)
    for j in range(d + 1):
        # n1: key - 1 in every coordinate but j, key_j + d (j < d); for j = d all - 1; n2 = key - that
        delta = -sum(strides) + (d + 1) * strides[j] if j < d else -sum(strides)
        q = uniq + delta
        pos = torch.searchsorted(uniq, q).clamp_(max=m - 1)
        found = uniq[pos] == q
        neighbors[j, 0] = torch.where(found, pos + 1, torch.zeros_like(pos))
        # b = n1(a) exactly when a = n2(b): one search serves both sides
        n2 = torch.zeros(m + 1, dtype=torch.int64, device=dev)
        n2[torch.where(found, pos, torch.full_like(pos, m))] = me + 1
        neighbors[j, 1] = n2[:m]
    offsets = (inverse + 1).reshape(b * n, d + 1)
    ops = _sparse_operators(offsets - 1, bary, neighbors, m, d, point, perm)
    return Lattice(offsets=offsets, weights=bary, neighbors=neighbors, d=d, num_points=m, ops=ops)


def _csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, size=shape)


def _sparse_operators(vertex: torch.Tensor, bary: torch.Tensor, neighbors: torch.Tensor, m: int, d: int,
                      point: torch.Tensor, perm: torch.Tensor) -> dict:
    """The lattice's linear maps as CSR matrices over a table of T = M + 2 rows (rows M and M + 1
    stay zero: the absent n1 and n2 neighbours, as the C++'s row 0): splat S (T x P, S[v, n] =
    b_r(n) for v = vertex_r(n)), blur B_j (T x T: 1 on the diagonal, 1/2 at the n1 and n2
    neighbours along j, exactly 3 entries a row, so no size depends on the data) and slice
    alpha S^T (P x T). `point`, `perm`: the lattice point of each entry in key order and the
    entries' flat (pixel-major) index. A CSR product sums a row's entries in column order: a
    splat adds its pixels in pixel order, as the C++ does."""
    p = vertex.shape[0]
    dev = vertex.device
    t = m + 2
    crow = torch.zeros(t + 1, dtype=torch.int64, device=dev)
    crow[1:m + 1] = torch.cumsum(torch.bincount(point, minlength=m), dim=0)
    crow[m + 1:] = crow[m]
    ops = {"splat": _csr(crow, perm // (d + 1), bary.reshape(-1)[perm], (t, p))}
    alpha = torch.tensor(1.0 / (1.0 + 2.0 ** -d), dtype=torch.float32, device=dev)
    cols, order = torch.sort(vertex, dim=1)  # a pixel's d+1 vertices are distinct points
    crow = torch.arange(0, p * (d + 1) + 1, d + 1, device=dev)
    ops["slice"] = _csr(crow, cols.reshape(-1), (torch.gather(bary, 1, order) * alpha).reshape(-1), (p, t))
    me = torch.arange(m, device=dev)
    weights = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float32, device=dev).expand(m, 3)
    crow = torch.cat([torch.arange(0, 3 * m + 1, 3, device=dev), torch.full((2,), 3 * m, device=dev)])
    blur = []
    for j in range(d + 1):
        n1 = torch.where(neighbors[j, 0] > 0, neighbors[j, 0] - 1, torch.full_like(me, m))  # absent: zero row M
        n2 = torch.where(neighbors[j, 1] > 0, neighbors[j, 1] - 1, torch.full_like(me, m + 1))  # and M + 1
        cols, order = torch.sort(torch.stack([me, n1, n2], dim=1), dim=1)  # three distinct columns
        blur.append(_csr(crow, cols.reshape(-1), torch.gather(weights, 1, order).reshape(-1), (t, t)))
    ops["blur"] = blur
    return ops


def lattice_filter(lattice: Lattice, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """P x C float32 values -> P x C: splat, blur along the d+1 directions (d..0 with `reverse`),
    slice; as CSR products (the fast path; `lattice_filter_gather` is the same in gathers)."""
    ops = lattice.ops
    table = ops["splat"] @ values
    blur = ops["blur"][::-1] if reverse else ops["blur"]
    for b in blur:
        table = b @ table
    return ops["slice"] @ table


def lattice_filter_gather(lattice: Lattice, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """lattice_filter in index_add_ and gathers, the C++'s operations in the C++'s order per element
    (C <= 2 slices as its sequential path, (b v) alpha; C > 2 as its SSE path, (b alpha) v)."""
    p, c = values.shape
    d = lattice.d
    table = torch.zeros(lattice.num_points + 1, c, dtype=torch.float32, device=values.device)
    contrib = lattice.weights[:, :, None] * values[:, None, :]  # P x (d+1) x C
    table.index_add_(0, lattice.offsets.reshape(-1), contrib.reshape(-1, c))
    directions = range(d, -1, -1) if reverse else range(d + 1)
    for j in directions:
        n1, n2 = lattice.neighbors[j]
        blurred = table[1:] + 0.5 * (table[n1] + table[n2])
        table = torch.cat([table[:1], blurred], dim=0)
    alpha = torch.tensor(lattice.alpha, dtype=torch.float32, device=values.device)
    out = torch.zeros(p, c, dtype=torch.float32, device=values.device)
    for r in range(d + 1):
        w = lattice.weights[:, r:r + 1]
        gathered = table[lattice.offsets[:, r]]
        out = out + ((w * gathered) * alpha if c <= 2 else (w * alpha) * gathered)
    return out


IMPLS = ("csr", "gather")


def _filter(impl: str):
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return lattice_filter if impl == "csr" else lattice_filter_gather


class DenseKernel:
    """A Gaussian pairwise kernel with NORMALIZE_SYMMETRIC: apply(Q) = n * L(n * Q), n = 1 /
    sqrt(L 1 + 1e-20) (computed in double, stored float32, as pairwise.cpp). impl: "csr"
    (lattice_filter, the default) or "gather" (lattice_filter_gather)."""

    def __init__(self, features: torch.Tensor, impl: str = "csr"):
        self.filter = _filter(impl)
        self.lattice = build_lattice(features)
        ones = torch.ones(features.shape[0] * features.shape[1], 1, dtype=torch.float32, device=features.device)
        norm = self.filter(self.lattice, ones)
        self.norm = (1.0 / torch.sqrt(norm.double() + 1e-20)).float()  # P x 1

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        return self.filter(self.lattice, q * self.norm) * self.norm


def pixel_features(images: torch.Tensor, xy: float, rgb: float | None = None) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x HW x d float32: (x/xy, y/xy) or (x/xy, y/xy, r/rgb, g/rgb, b/rgb),
    pixel j W + i, as DenseCRF2D's addPairwiseGaussian / addPairwiseBilateral (float32 divisions)."""
    b, h, w, _ = images.shape
    dev = images.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    cols = [xs.reshape(-1), ys.reshape(-1)]
    feats = [c / torch.full_like(c, xy) for c in cols]  # element-wise IEEE division (no reciprocal)
    feats = [f[None].expand(b, -1) for f in feats]
    if rgb is not None:
        colour = images.reshape(b, h * w, 3).to(torch.float32)
        feats += [colour[..., k] / torch.full_like(colour[..., k], rgb) for k in range(3)]
    return torch.stack(feats, dim=2).contiguous()


def mean_field(unary: torch.Tensor, kernels: Sequence[tuple[float, DenseKernel]], iters: int) -> torch.Tensor:
    """P x C unary -> P x C marginals: Q = softmax(-U); iters times Q = softmax(-U + sum w_k F_k(Q))."""
    neg = -unary
    q = torch.softmax(neg, dim=1)
    for _ in range(iters):
        acc = neg
        for weight, kernel in kernels:
            acc = acc - (-weight) * kernel.apply(q)  # Potts: compatibility -w, subtracted (densecrf.cpp)
        q = torch.softmax(acc, dim=1)
    return q


def dense_crf_batch(images: torch.Tensor, probs: torch.Tensor, iters: int = 10, pos_xy: float = 1.0,
                    pos_w: float = 3.0, bi_xy: float = 67.0, bi_rgb: float = 3.0, bi_w: float = 4.0,
                    impl: str = "csr") -> torch.Tensor:
    """B x H x W x 3 uint8 images and B x C x H x W scores in [0, 1] (same device) -> B x C x H x W
    float32 marginals, pydensecrf's DenseCRF2D with addPairwiseGaussian(pos_xy, pos_w) and
    addPairwiseBilateral(bi_xy, bi_rgb, image, bi_w). Inputs are checked by more_fast.crf.dense_crf.
    impl: the lattice filter, "csr" (sparse products, deterministic) or "gather" (index_add_ and
    gathers; on CUDA the splat's atomics make the last bits vary run to run)."""
    b, c, h, w = probs.shape
    unary = -torch.log(probs.float().clamp(1e-5, 1.0))  # pydensecrf.utils.unary_from_softmax
    unary = unary.permute(0, 2, 3, 1).reshape(b * h * w, c)
    kernels = []
    if pos_w != 0:
        kernels.append((pos_w, DenseKernel(pixel_features(images, pos_xy), impl)))
    if bi_w != 0:
        kernels.append((bi_w, DenseKernel(pixel_features(images, bi_xy, bi_rgb), impl)))
    q = mean_field(unary, kernels, iters)
    return q.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
