"""par_refine (docs/METHOD.md, PAR pseudo labels) alone: reference eager, reference compiled, fused.
Forward only (no grad).

Production shape: PAR runs at half the 448 crop, so B = 4 images of 224 x 224, C = 4, 21 (VOC)
and 81 (COCO) mask channels per background threshold, both thresholds refined in one call (2C
channels), dilations (1, 2, 4, 8, 12, 24) (J = 48 neighbours), 10 iterations, fp32 masks.

DRAM bytes per call (counted, not measured: no GPU has run this yet; MB = 1e6 B). Ideal: the
image read once, the B x J x HW affinity written once in its storage dtype, then per iteration
the fp32 masks read and written once and the affinity read once.

| shape (2C channels)  | ideal, bf16 affinity | ideal, fp32 affinity | this kernel | previous kernel |
| -------------------- | -------------------- | -------------------- | ----------- | --------------- |
| VOC, C = 42          | 889 MB               | 1,101 MB             | 889 MB      | 1,871 MB        |
| COCO, C = 162        | 2,815 MB             | 3,027 MB             | 2,815 MB    | 6,881 MB        |

(masks 33.7 MB per pass at C = 42, 130.1 MB at C = 162; affinity 19.3 MB bf16, 38.5 MB fp32.)
The previous kernel put pixel tiles on the fastest grid axis, so each of its 3 (VOC) or 11
(COCO) channel blocks re-read the fp32 affinity from DRAM every iteration. This one puts the
channel block fastest: the blocks of one pixel tile run side by side and share its affinity
tile through L2, so the count above is the ideal (1.0x, target <= 1.5x) provided the 48-fold
neighbour re-reads of the masks hit L1/L2. They should: a mask pixel is needed by the tiles
within +-24 rows, +-42 tiles of 128 pixels at W = 224, and the traffic between its first and
last use is about 85 tiles x (masks in + out + affinity) = 15 MB at C = 162, under the 50 MB
L2 of an H100. A GPU run confirms it with Nsight Compute's dram__bytes (not done yet).

On the CPU the production-shape reference takes minutes per call (one iteration alone is ~15 s
on 2 cores: it materializes B x 2C x 48 x H x W), so it skips there, and a CPU stand-in shape
(B = 4, 32 x 32, C = 4) runs the eager reference instead, marked `cpu_standin` in its shape.
The compiled reference is timed on CUDA only: inductor on the CPU spends minutes compiling the
unrolled 10-iteration graph.
"""
import pytest
import torch

from common import DEVICE, VARIANTS, measure, op_variant

DILATIONS = (1, 2, 4, 8, 12, 24)
NUM_ITER = 10
AFFINITY_STORAGE = "fp32"  # the reference takes every argument; fp32 is the op's default
B, SIZE = 4, 224
CPU_STANDIN_SIZE = 32
CASES = [("production", SIZE, 4), ("production", SIZE, 21), ("production", SIZE, 81)]
if DEVICE.type != "cuda":
    CASES.append(("cpu_standin", CPU_STANDIN_SIZE, 4))


def _ideal_bytes(c2: int, hw: int, img_elt: int, aff_elt: int) -> float:
    """Image read once, the B x J x HW affinity written once (aff_elt bytes a weight: 4 in fp32,
    the op's default storage, 2 in bf16), then per iteration the fp32 masks read and written once and the affinity read
    once (an iteration needs the previous one everywhere within 24 pixels, so iterations cannot
    share a pass)."""
    j = 8 * len(DILATIONS)
    aff = B * j * hw * aff_elt
    return B * 3 * hw * img_elt + aff + NUM_ITER * (2 * B * c2 * hw * 4 + aff)


def _transcendentals(hw: int) -> float:
    """The affinity's exp per (pixel, neighbour) and sqrt per (pixel, image channel)."""
    return B * (8 * len(DILATIONS) + 3) * hw


def _flops(c2: int, hw: int) -> float:
    j = 8 * len(DILATIONS)
    return NUM_ITER * 2.0 * B * c2 * j * hw + B * j * hw * 3 * 10


@pytest.mark.parametrize("case, size, c", CASES, ids=[f"{n}-{s}x{s}-C{c}" for n, s, c in CASES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_par_refine(benchmark, variant, case, size, c):
    if DEVICE.type != "cuda" and variant != "fused":
        if case == "production":
            pytest.skip("reference PAR at 4 x 42 x 224 x 224 takes minutes per call on the CPU "
                        "(the cpu_standin case runs instead)")
        if variant == "reference_compiled":
            pytest.skip("compiling the unrolled 10-iteration reference takes minutes on the CPU")
    fn = op_variant("par_refine", variant)
    gen = torch.Generator(device="cpu").manual_seed(0)
    c2 = 2 * c  # the two background thresholds, concatenated along C
    image = (torch.rand(B, 3, size, size, generator=gen) * 255).to(DEVICE)
    masks = torch.randn(B, c2, size, size, generator=gen).softmax(1).to(DEVICE)
    hw = size * size
    cpu = DEVICE.type != "cuda"
    with torch.no_grad():
        measure(
            benchmark,
            lambda: fn(image, masks, DILATIONS, NUM_ITER, AFFINITY_STORAGE),
            variant=variant,
            pass_="fwd",
            shape=dict(case=case, B=B, H=size, W=size, C=c2, mask_sets=2, J=8 * len(DILATIONS),
                       num_iter=NUM_ITER, dtype="float32"),
            nbytes=_ideal_bytes(c2, hw, image.element_size(), 4 if AFFINITY_STORAGE == "fp32" else 2),
            flops=_flops(c2, hw),
            transcendentals=_transcendentals(hw),
            rounds=1 if cpu else None,
            warmup=0 if cpu else 2,  # the eager reference needs no warm-up on the CPU
        )
