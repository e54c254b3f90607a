"""The published MoRe architecture's defaults (docs/METHOD.md, Network), defined here only.

MoReNet and its parts (MoReBackbone, GCR, LargeFOV) and TrainConfig's model fields read them from
here; a recipe that differs (the synthetic one's narrow decoder) sets its own value in its recipe."""
NUM_REGISTERS = 4  # R: tokens that only take part in attention
TOPK_RATIO = 0.5  # GCR: k = int(0.5 K), at least 1
GCR_SCORE = "published"  # GCR's aggregation score: published (product of sums) | dot
DECODER_DIM = 512  # LargeFOV width
ATTN_IMPL = "sdpa"  # the same attention as published, through fused SDPA (explicit: the published way)
