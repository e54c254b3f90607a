"""Bad input is rejected early, with a message that names the culprit.

Kernels: every public op, on both backends (kernels.use_backend: reference and triton), raises
ValueError or TypeError whose message starts with the argument's name (`name: expected ...`,
the fused-op contract (README, Fused ops and backends)) for wrong ranks and shapes, mismatched batches, wrong dtypes, labels that
are not integers, bad scalars (temperature, k, reduce, num_prefix, num_cls, dilations, num_iter,
sigmas). tests/test_reference.py's BAD_CASES covers a first set; the cases here are the others.
The kernel cases build their tensors on tests/helpers.DEVICE (CUDA when available: the Triton
backend then runs compiled; else the CPU and the interpreter). Tensors on different devices are
not tested here.
Degenerate (empty) shapes: both backends must agree, either on the same result or on a
ValueError naming the argument.

CLI: `scripts/train.py` exits with code 2 and an error naming the flag, before any work starts
(the Trainer is never built). In-process through `main()` of scripts/train.py with a Trainer
that fails when constructed, plus one real subprocess.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import kernels
from helpers import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["reference", "triton"]


@pytest.fixture
def on_device():
    """Tensor factories (torch.randn, torch.zeros, ...) make their tensors on DEVICE."""
    with torch.device(DEVICE):
        yield DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request, on_device):
    with kernels.use_backend(request.param):
        yield request.param


def lab(*shape, dtype=torch.long):
    return torch.zeros(shape, dtype=dtype)


def _aff(tokens=None, labels=None, ignore_index=255):
    tokens = torch.randn(2, 5, 3) if tokens is None else tokens
    labels = lab(2, 5) if labels is None else labels
    return kernels.affinity_loss(tokens, labels, ignore_index)


def _lir(cls_tokens=None, patch_tokens=None, labels=None, cls_labels=None, temperature=0.5):
    cls_tokens = torch.randn(2, 3, 4) if cls_tokens is None else cls_tokens
    patch_tokens = torch.randn(2, 5, 4) if patch_tokens is None else patch_tokens
    labels = lab(2, 5) if labels is None else labels
    cls_labels = torch.ones(2, 3) if cls_labels is None else cls_labels
    return kernels.lir_loss(cls_tokens, patch_tokens, labels, cls_labels, temperature)


def _gcr(h=None, e=None, k=2, score="published"):
    h = torch.randn(2, 3, 4) if h is None else h
    e = torch.randn(2, 7, 4) if e is None else e
    return kernels.gcr_aggregate(h, e, k, score)


def _cpa(q=None, k=None, num_prefix=1, num_cls=2, reduce="mean_softmax"):
    q = torch.randn(1, 2, 6, 4) if q is None else q
    k = torch.randn(1, 2, 6, 4) if k is None else k
    return kernels.class_patch_attention(q, k, num_prefix, num_cls, reduce)


def _par(image=None, masks=None, dilations=(1, 2), num_iter=1):
    image = torch.rand(1, 3, 8, 8) * 255 if image is None else image
    masks = torch.rand(1, 2, 8, 8) if masks is None else masks
    return kernels.par_refine(image, masks, dilations, num_iter)


def _energy(image=None, probs=None, gate=None, sigma_rgb=15.0, sigma_xy=50.0):
    image = torch.rand(1, 3, 8, 8) * 255 if image is None else image
    probs = torch.rand(1, 2, 8, 8) if probs is None else probs
    gate = torch.rand(1, 8, 8) if gate is None else gate
    return kernels.dense_energy_loss(image, probs, gate, sigma_rgb, sigma_xy)


# (id, call, exception, argument named at the start of the message)
CASES = [
    # ---------------------------------------------------------------- affinity_loss
    ("aff-tokens-numpy", lambda: _aff(tokens=np.zeros((2, 5, 3), np.float32)), TypeError, "tokens"),
    ("aff-tokens-rank4", lambda: _aff(tokens=torch.randn(2, 5, 3, 1)), ValueError, "tokens"),
    ("aff-tokens-bool", lambda: _aff(tokens=torch.ones(2, 5, 3, dtype=torch.bool)), TypeError, "tokens"),
    ("aff-labels-list", lambda: _aff(labels=[[0] * 5] * 2), TypeError, "labels"),
    ("aff-labels-rank3", lambda: _aff(labels=lab(2, 5, 1)), ValueError, "labels"),
    ("aff-labels-batch", lambda: _aff(labels=lab(3, 5)), ValueError, "labels"),
    ("aff-labels-fp16", lambda: _aff(labels=lab(2, 5, dtype=torch.float16)), TypeError, "labels"),
    ("aff-labels-bool", lambda: _aff(labels=lab(2, 5, dtype=torch.bool)), TypeError, "labels"),
    ("aff-ignore-float", lambda: _aff(ignore_index=255.0), TypeError, "ignore_index"),
    ("aff-ignore-none", lambda: _aff(ignore_index=None), TypeError, "ignore_index"),
    ("aff-ignore-bool", lambda: _aff(ignore_index=True), TypeError, "ignore_index"),
    ("aff-ignore-too-large", lambda: _aff(ignore_index=2**63), ValueError, "ignore_index"),  # below: -2**31
    # ---------------------------------------------------------------- lir_loss
    ("lir-cls-rank2", lambda: _lir(cls_tokens=torch.randn(3, 4)), ValueError, "cls_tokens"),
    ("lir-cls-int", lambda: _lir(cls_tokens=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, "cls_tokens"),
    ("lir-patch-rank4", lambda: _lir(patch_tokens=torch.randn(2, 5, 4, 1)), ValueError, "patch_tokens"),
    ("lir-patch-int", lambda: _lir(patch_tokens=torch.zeros(2, 5, 4, dtype=torch.int32)), TypeError, "patch_tokens"),
    ("lir-patch-channels", lambda: _lir(patch_tokens=torch.randn(2, 5, 6)), ValueError, "patch_tokens"),
    ("lir-labels-float", lambda: _lir(labels=torch.zeros(2, 5)), TypeError, "labels"),
    ("lir-labels-bool", lambda: _lir(labels=lab(2, 5, dtype=torch.bool)), TypeError, "labels"),
    ("lir-labels-length", lambda: _lir(labels=lab(2, 4)), ValueError, "labels"),
    ("lir-labels-batch", lambda: _lir(labels=lab(1, 5)), ValueError, "labels"),
    ("lir-cls-labels-rank3", lambda: _lir(cls_labels=torch.ones(2, 3, 1)), ValueError, "cls_labels"),
    ("lir-cls-labels-batch", lambda: _lir(cls_labels=torch.ones(1, 3)), ValueError, "cls_labels"),
    ("lir-temperature-negative", lambda: _lir(temperature=-0.5), ValueError, "temperature"),
    ("lir-temperature-nan", lambda: _lir(temperature=math.nan), ValueError, "temperature"),
    ("lir-temperature-str", lambda: _lir(temperature="0.5"), TypeError, "temperature"),
    ("lir-temperature-none", lambda: _lir(temperature=None), TypeError, "temperature"),
    ("lir-temperature-bool", lambda: _lir(temperature=True), TypeError, "temperature"),
    # ---------------------------------------------------------------- gcr_aggregate
    ("gcr-h-rank2", lambda: _gcr(h=torch.randn(3, 4)), ValueError, "h"),
    ("gcr-h-int", lambda: _gcr(h=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, "h"),
    ("gcr-e-rank2", lambda: _gcr(e=torch.randn(7, 4)), ValueError, "e"),
    ("gcr-e-batch", lambda: _gcr(e=torch.randn(3, 7, 4)), ValueError, "e"),
    ("gcr-e-dtype", lambda: _gcr(e=torch.randn(2, 7, 4, dtype=torch.float16)), TypeError, "e"),
    ("gcr-k-negative", lambda: _gcr(k=-1), ValueError, "k"),
    ("gcr-k-float", lambda: _gcr(k=2.0), TypeError, "k"),
    ("gcr-k-none", lambda: _gcr(k=None), TypeError, "k"),
    ("gcr-score-none", lambda: _gcr(score=None), ValueError, "score"),
    # ---------------------------------------------------------------- class_patch_attention
    ("cpa-q-rank3", lambda: _cpa(q=torch.randn(2, 6, 4), k=torch.randn(2, 6, 4)), ValueError, "q"),
    ("cpa-q-int", lambda: _cpa(q=torch.zeros(1, 2, 6, 4, dtype=torch.long)), TypeError, "q"),
    ("cpa-k-shape", lambda: _cpa(k=torch.randn(1, 2, 7, 4)), ValueError, "k"),
    ("cpa-k-batch", lambda: _cpa(k=torch.randn(2, 2, 6, 4)), ValueError, "k"),
    ("cpa-k-dtype", lambda: _cpa(k=torch.randn(1, 2, 6, 4, dtype=torch.float16)), TypeError, "k"),
    ("cpa-head-dim-0", lambda: _cpa(q=torch.randn(1, 2, 6, 0), k=torch.randn(1, 2, 6, 0)), ValueError, "q"),
    ("cpa-num-prefix-negative", lambda: _cpa(num_prefix=-1), ValueError, "num_prefix"),
    ("cpa-num-prefix-float", lambda: _cpa(num_prefix=1.0), TypeError, "num_prefix"),
    ("cpa-num-cls-0", lambda: _cpa(num_cls=0), ValueError, "num_cls"),
    ("cpa-num-cls-float", lambda: _cpa(num_cls=2.0), TypeError, "num_cls"),
    ("cpa-no-patch-no-prefix", lambda: _cpa(num_prefix=0, num_cls=6), ValueError, r"num_prefix \+ num_cls"),
    ("cpa-past-T", lambda: _cpa(num_prefix=4, num_cls=5), ValueError, r"num_prefix \+ num_cls"),
    ("cpa-reduce-none", lambda: _cpa(reduce=None), ValueError, "reduce"),
    # ---------------------------------------------------------------- par_refine
    ("par-image-rank3", lambda: _par(image=torch.rand(3, 8, 8)), ValueError, "image"),
    ("par-image-uint8", lambda: _par(image=torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), TypeError, "image"),
    # any channel count >= 1 works (a grayscale image is tested in test_kernel_par.py); with none,
    # both backends return NaN masks
    ("par-image-channels-0", lambda: _par(image=torch.rand(1, 0, 8, 8)), ValueError, "image"),
    ("par-masks-rank3", lambda: _par(masks=torch.rand(2, 8, 8)), ValueError, "masks"),
    ("par-masks-int", lambda: _par(masks=torch.zeros(1, 2, 8, 8, dtype=torch.long)), TypeError, "masks"),
    ("par-masks-batch", lambda: _par(masks=torch.rand(2, 2, 8, 8)), ValueError, "masks"),
    ("par-masks-height", lambda: _par(masks=torch.rand(1, 2, 7, 8)), ValueError, "masks"),
    ("par-dilation-0", lambda: _par(dilations=[1, 0]), ValueError, "dilations"),
    ("par-dilation-negative", lambda: _par(dilations=(-2,)), ValueError, "dilations"),
    ("par-dilation-float", lambda: _par(dilations=[1.5]), TypeError, "dilations"),
    ("par-dilations-int", lambda: _par(dilations=2), TypeError, "dilations"),
    ("par-dilations-str", lambda: _par(dilations="12"), TypeError, "dilations"),
    ("par-dilation-int32-overflow", lambda: _par(dilations=[1, 2**31]), ValueError, "dilations"),  # int32 offsets
    ("par-num-iter-float", lambda: _par(num_iter=2.0), TypeError, "num_iter"),
    ("par-num-iter-none", lambda: _par(num_iter=None), TypeError, "num_iter"),
    # ---------------------------------------------------------------- dense_energy_loss
    ("energy-image-rank3", lambda: _energy(image=torch.rand(3, 8, 8)), ValueError, "image"),
    ("energy-image-uint8", lambda: _energy(image=torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), TypeError, "image"),
    ("energy-probs-int", lambda: _energy(probs=torch.zeros(1, 2, 8, 8, dtype=torch.long)), TypeError, "probs"),
    ("energy-probs-rank3", lambda: _energy(probs=torch.rand(2, 8, 8)), ValueError, "probs"),
    ("energy-probs-batch", lambda: _energy(probs=torch.rand(2, 2, 8, 8)), ValueError, "probs"),
    ("energy-probs-size", lambda: _energy(probs=torch.rand(1, 2, 8, 9)), ValueError, "probs"),
    ("energy-gate-rank4", lambda: _energy(gate=torch.rand(1, 1, 8, 8)), ValueError, "gate"),
    ("energy-gate-batch", lambda: _energy(gate=torch.rand(2, 8, 8)), ValueError, "gate"),
    ("energy-gate-bool", lambda: _energy(gate=torch.ones(1, 8, 8, dtype=torch.bool)), TypeError, "gate"),
    ("energy-sigma-rgb-0", lambda: _energy(sigma_rgb=0.0), ValueError, "sigma_rgb"),
    ("energy-sigma-rgb-nan", lambda: _energy(sigma_rgb=math.nan), ValueError, "sigma_rgb"),
    ("energy-sigma-xy-0", lambda: _energy(sigma_xy=0), ValueError, "sigma_xy"),
    ("energy-sigma-xy-negative", lambda: _energy(sigma_xy=-50.0), ValueError, "sigma_xy"),
    ("energy-sigma-xy-str", lambda: _energy(sigma_xy="50"), TypeError, "sigma_xy"),
]


@pytest.mark.parametrize("call, error, name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kernel_rejects_bad_input_naming_the_argument(backend, call, error, name):
    with pytest.raises(error, match=rf"^{name}:"):
        call()


# Empty shapes are legal tensors; whatever an op makes of them, both backends must make the same:
# the same result, or a ValueError naming the argument. (An unnamed RuntimeError / ZeroDivisionError
# from inside one backend is neither.)
EMPTY_CASES = [
    ("aff-N0", lambda: _aff(tokens=torch.randn(2, 0, 3), labels=lab(2, 0))),
    ("aff-B0", lambda: _aff(tokens=torch.randn(0, 5, 3), labels=lab(0, 5))),
    ("lir-B0", lambda: _lir(torch.randn(0, 3, 4), torch.randn(0, 5, 4), lab(0, 5), torch.ones(0, 3))),
    ("lir-N0", lambda: _lir(patch_tokens=torch.randn(2, 0, 4), labels=lab(2, 0))),
    ("gcr-K0", lambda: _gcr(h=torch.randn(2, 0, 4))),
    ("gcr-D0", lambda: _gcr(h=torch.randn(2, 3, 0), e=torch.randn(2, 7, 0))),
    ("cpa-B0", lambda: _cpa(q=torch.randn(0, 2, 6, 4), k=torch.randn(0, 2, 6, 4))),
    ("par-B0", lambda: _par(image=torch.rand(0, 3, 8, 8), masks=torch.rand(0, 2, 8, 8))),
    ("par-H0", lambda: _par(image=torch.rand(1, 3, 0, 8), masks=torch.rand(1, 2, 0, 8))),
    ("par-C0", lambda: _par(masks=torch.rand(1, 0, 8, 8))),
    ("energy-B0", lambda: _energy(torch.rand(0, 3, 8, 8), torch.rand(0, 2, 8, 8), torch.rand(0, 8, 8))),
    ("energy-H0", lambda: _energy(torch.rand(1, 3, 0, 8), torch.rand(1, 2, 0, 8), torch.rand(1, 0, 8))),
    ("energy-C0", lambda: _energy(probs=torch.rand(1, 0, 8, 8))),
]
_ARG_NAMES = r"^(tokens|labels|cls_tokens|patch_tokens|cls_labels|h|e|q|k|image|masks|probs|gate):"


def _outcome(call):
    try:
        return "value", call()
    except (ValueError, TypeError) as err:
        assert re.match(_ARG_NAMES, str(err)), f"{type(err).__name__} that names no argument: {err}"
        return "error", str(err)


@pytest.mark.parametrize("call", [c[1] for c in EMPTY_CASES], ids=[c[0] for c in EMPTY_CASES])
def test_empty_shapes_agree_across_backends(call, monkeypatch, on_device):
    outcomes = {}
    for name in BACKENDS:
        torch.manual_seed(0)
        with kernels.use_backend(name):
            outcomes[name] = _outcome(call)
    (kind_r, ref), (kind_t, fused) = outcomes["reference"], outcomes["triton"]
    assert kind_r == kind_t, outcomes
    if kind_r == "value":
        assert fused.shape == ref.shape and fused.dtype == ref.dtype, outcomes
        assert torch.equal(fused.isnan(), ref.isnan()) and torch.allclose(fused, ref, equal_nan=True), outcomes


def test_the_ops_do_not_read_the_environment(monkeypatch, triton_affinity_raises, on_device):
    """MORE_FAST_KERNELS is the default of the scripts' --kernels flag only (test_scripts.py)."""
    monkeypatch.setenv("MORE_FAST_KERNELS", "cuda")
    assert kernels.backend_mode() == "auto"
    with kernels.use_backend("triton"):
        assert _ran_triton()
    with kernels.use_backend("reference"):
        assert not _ran_triton()


# --------------------------------------------------------------------------------------------
# kernels.use_backend: the backend switch as a context (the env stays the default)
# --------------------------------------------------------------------------------------------
class _Dispatched(Exception):
    pass


@pytest.fixture
def triton_affinity_raises(monkeypatch):
    """The Triton affinity op replaced by one that raises: a call shows which backend ran."""

    def fake(*args):
        raise _Dispatched

    monkeypatch.setattr(kernels.affinity, "affinity_loss", fake)


def _ran_triton() -> bool:
    try:
        _aff()
    except _Dispatched:
        return True
    return False


def test_use_backend_nests_and_restores(triton_affinity_raises, on_device):
    env_before = dict(os.environ)
    with kernels.use_backend("triton"):
        assert kernels.backend_mode() == "triton" and _ran_triton()
        with kernels.use_backend("reference"):
            assert kernels.backend_mode() == "reference" and not _ran_triton()
            with kernels.use_backend("triton"):
                assert kernels.backend_mode() == "triton" and _ran_triton()
                with kernels.use_backend("AUTO"):
                    assert kernels.backend_mode() == "auto"
            assert kernels.backend_mode() == "reference" and not _ran_triton()
        assert kernels.backend_mode() == "triton" and _ran_triton()
    assert kernels.backend_mode() == "auto"
    assert dict(os.environ) == env_before  # nothing written into the environment


def test_use_backend_restores_on_exception():
    with kernels.use_backend("reference"):
        with pytest.raises(KeyError, match="inside"):
            with kernels.use_backend("triton"):
                with kernels.use_backend("auto"):
                    raise KeyError("inside")
        assert kernels.backend_mode() == "reference"
    assert kernels.backend_mode() == "auto"
    with kernels.use_backend("triton"):
        with pytest.raises(ZeroDivisionError):
            with kernels.use_backend("reference"):
                1 / 0
        assert kernels.backend_mode() == "triton"


@pytest.mark.parametrize("bad", ["cuda", "", None, 1])
def test_use_backend_with_a_bad_value_names_it(bad):
    with pytest.raises(ValueError, match=r"^use_backend: expected one of .*got " + re.escape(repr(bad))):
        with kernels.use_backend(bad):
            pass


def test_use_backend_is_seen_by_compiled_code():
    """torch.compile guards on the active mode: a graph traced under one mode is not reused under
    another (the training step compiles its losses and enters use_backend around them). fullgraph:
    reading the mode is traceable on every supported stack (torch 2.11's dynamo cannot trace a
    ContextVar)."""

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + 1 if kernels.backend_mode() == "reference" else x * 2

    x = torch.full((2,), 3.0)
    assert f(x).tolist() == [6.0, 6.0]
    with kernels.use_backend("reference"):
        assert f(x).tolist() == [4.0, 4.0]
    assert f(x).tolist() == [6.0, 6.0]


def test_use_backend_is_process_wide():
    """One mode for the process (as timm's fused_attn): a thread started inside a block sees it."""
    import threading

    seen = {}
    with kernels.use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.update(mode=kernels.backend_mode()))
        worker.start()
        worker.join()
        assert kernels.backend_mode() == "reference"
    assert seen["mode"] == "reference" and kernels.backend_mode() == "auto"


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_choose_backend_resolves_once_per_device(interpret, device, monkeypatch):
    """What a run holds for its --kernels: triton where it runs (CUDA, or the interpreter on the CPU)."""
    monkeypatch.setattr(kernels, "_INTERPRET", interpret)
    runs = device.startswith("cuda") or interpret
    assert kernels.choose_backend("auto", device) == ("triton" if runs else "reference")
    assert kernels.choose_backend(" Reference ", torch.device(device)) == "reference"
    if runs:
        assert kernels.choose_backend("triton", device) == "triton"
    else:
        with pytest.raises(ValueError, match=r"^kernels: 'triton' cannot run on cpu: it needs a CUDA device, "
                                             r"or TRITON_INTERPRET=1"):
            kernels.choose_backend("triton", device)
    monkeypatch.setattr(kernels, "_TRITON_LOADED", False)  # no triton package: only the reference
    assert kernels.choose_backend("auto", device) == "reference"
    with pytest.raises(ValueError, match=r"^kernels: 'triton' needs the triton package"):
        kernels.choose_backend("triton", device)


@pytest.mark.parametrize("bad", ["cuda", "", None])
def test_choose_backend_and_resolve_backend_name_a_bad_value(bad):
    with pytest.raises(ValueError, match=r"^kernels: expected one of .*got " + re.escape(repr(bad))):
        kernels.choose_backend(bad, "cpu")
    with pytest.raises(ValueError, match=r"^resolve_backend: expected an op in .*got " + re.escape(repr(bad))):
        kernels.resolve_backend(bad, torch.device("cpu"))


@pytest.mark.parametrize("script", ["train", "evaluate", "infer", "pseudo_labels"])
def test_scripts_refuse_an_unrunnable_triton_before_any_work(script, monkeypatch, tmp_path, capsys):
    """--kernels triton on the CPU without the interpreter: exit 2 naming kernels, nothing read or written."""
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location(f"_refuse_{script}", os.path.join(ROOT, "scripts", f"{script}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = {"train": [], "evaluate": ["--checkpoint", "missing.pt"],
            "infer": ["--checkpoint", "missing.pt", "--images", "missing", "--out", "panels"],
            "pseudo_labels": ["--checkpoint", "missing.pt", "--out", "labels"]}[script]
    assert mod.main([*argv, "--kernels", "triton", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: kernels: 'triton' cannot run on cpu: it needs a CUDA device, or TRITON_INTERPRET=1 set "
                   "before triton is imported (the interpreter); use auto or reference"], err
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# scripts/train.py
# --------------------------------------------------------------------------------------------
def _load_train_script():
    spec = importlib.util.spec_from_file_location("_train_script_under_test", os.path.join(ROOT, "scripts", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def train_script():
    return _load_train_script()


CLI_CASES = [
    (["--crop-size", "30"], "--crop-size"),
    (["--crop-size", "-16"], "--crop-size"),
    (["--iters", "0"], "--iters"),
    (["--iters", "1.5"], "--iters"),
    (["--data", "voc"], "--data-root"),
    (["--data", "coco"], "--data-root"),
    (["--data-root", "/nonexistent", "--data", "voc"], "--data-root"),
    (["--pretrained", "missing.pth"], "--pretrained"),
    (["--resume", "/nonexistent"], "--resume"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--kernels", "foo"], "--kernels"),
    (["--workers", "-1"], "--workers"),
    (["--seed", "abc"], "--seed"),
    (["--device", "tpu"], "--device"),
    (["--on-nonfinite", "ignore"], "--on-nonfinite"),
    # missing in more_fast/cli.py at the time of writing: accepted, then the run fails (or
    # silently misbehaves) after work has started
    (["--split-list", "/nonexistent/train.txt"], "--split-list"),
    (["--backbone", "no_such_vit"], "--backbone"),
    (["--eval-bkg", "nan"], "--eval-bkg"),
    (["--eval-bkg", "inf"], "--eval-bkg"),
]


@pytest.mark.parametrize("argv, flag", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_train_cli_exits_2_naming_the_flag_before_work(train_script, argv, flag, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative paths (missing.pth, runs/...) resolve here

    def no_work(*args, **kwargs):
        raise AssertionError(f"the Trainer was built for {argv}: the bad value was not caught first")

    monkeypatch.setattr(train_script, "Trainer", no_work)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        train_script.main(argv)
    assert exc.value.code == 2, err.getvalue()
    last = err.getvalue().strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and flag in last, last
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("data", ["voc", "coco"])
def test_recipe_weights_for_another_backbone_are_named(train_script, data, monkeypatch, tmp_path):
    """A recipe's pretrained tag names its architecture: another --backbone without --pretrained says
    so (not that the weights cannot be fetched), before any work."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setattr(train_script, "Trainer", lambda *a, **k: pytest.fail("the Trainer was built"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        train_script.main(["--data", data, "--data-root", str(root), "--backbone", "vit_tiny_patch16_224"])
    assert exc.value.code == 2
    last = err.getvalue().strip().splitlines()[-1]
    assert last == (f"train.py: error: --backbone: the {data} recipe's weights "
                    "(timm:vit_base_patch16_224.orig_in21k_ft_in1k) are for vit_base_patch16_224, not "
                    "vit_tiny_patch16_224: pass --pretrained FILE or timm:TAG with weights of vit_tiny_patch16_224, "
                    "or --pretrained none to train it from scratch"), last


def test_train_script_subprocess_rejects_missing_data_root(tmp_path):
    missing = tmp_path / "VOC2012"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--data", "voc",
                           "--data-root", str(missing), "--iters", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "--data-root" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert os.listdir(tmp_path) == []  # no runs/ folder, no synthetic data: nothing started


# --------------------------------------------------------------------------------------------
# train.py, evaluate.py, infer.py: one parent parser for --device, --kernels, --crop-size
# --------------------------------------------------------------------------------------------
def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}_script_under_test", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parsers():
    from more_fast.cli import build_parser

    return {"train": (build_parser(), []),
            "evaluate": (_load_script("evaluate").build_parser(), ["--checkpoint", "c.pt"]),
            "infer": (_load_script("infer").build_parser(), ["--checkpoint", "c.pt", "--images", "i", "--out", "o"])}


def _parse_error(parser, argv) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2, err.getvalue()
    return err.getvalue().strip().splitlines()[-1]


MISSING_GPU = f"cuda:{max(7, torch.cuda.device_count())}"
COMMON_BAD = [
    (["--device", MISSING_GPU], "--device", f"{MISSING_GPU} requested, but this machine has "),
    (["--device", "tpu"], "--device", "expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "--device", "expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--kernels", "cuda"], "--kernels", "expected one of auto, triton, reference, got 'cuda'"),
    (["--crop-size", "0"], "--crop-size", "expected a positive integer (a multiple of the patch size), got 0"),
    (["--crop-size", "4.5"], "--crop-size", "expected a positive integer (a multiple of the patch size), got 4.5"),
]


@pytest.mark.parametrize("script", ["train", "evaluate", "infer"])
def test_common_flags_are_validated_the_same_way_by_every_script(script, monkeypatch):
    monkeypatch.delenv("MORE_FAST_KERNELS", raising=False)
    parser, required = _parsers()[script]
    args = parser.parse_args(required + ["--device", "cpu", "--kernels", "reference", "--crop-size", "32"])
    assert (args.device, args.kernels, args.crop_size) == ("cpu", "reference", 32)
    args = parser.parse_args(required)
    assert (args.device, args.kernels, args.crop_size) == ("auto", "auto", None)
    for argv, flag, message in COMMON_BAD:
        last = _parse_error(parser, required + argv)
        assert last.startswith(f"{script}.py: error: argument {flag}: ") and message in last, last
        assert "invalid" not in last or "invalid choice" in last, last  # never `invalid <lambda> value`


@pytest.mark.parametrize("script", ["train", "evaluate", "infer"])
def test_kernels_flag_defaults_to_the_env(script, monkeypatch):
    monkeypatch.setenv("MORE_FAST_KERNELS", " Reference ")
    parser, required = _parsers()[script]
    assert parser.parse_args(required).kernels == "reference"
    assert parser.parse_args(required + ["--kernels", "triton"]).kernels == "triton"  # the flag wins
    monkeypatch.setenv("MORE_FAST_KERNELS", "cuda")
    parser, required = _parsers()[script]
    last = _parse_error(parser, required)
    assert last == (f"{script}.py: error: argument --kernels: expected one of auto, triton, reference, got 'cuda' "
                    f"(the default comes from MORE_FAST_KERNELS='cuda')"), last


def test_missing_gpu_names_what_the_machine_has():
    from more_fast.device import resolve_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError) as err:
        resolve_device(MISSING_GPU)
    have = "no CUDA device" if count == 0 else f"{count} CUDA device"
    assert str(err.value).startswith(f"--device: {MISSING_GPU} requested, but this machine has {have}"), err.value
    with pytest.raises(ValueError, match=r"^--device: expected auto, cpu, cuda or cuda:N, got 'gpu'$"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_auto_and_local_rank(monkeypatch):
    from more_fast.device import resolve_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == (torch.device("cuda", 0) if count else torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", str(count))  # a torchrun rank past the GPUs of this machine
    if count == 0:
        assert resolve_device("auto") == torch.device("cpu")  # auto: the CPU where there is no GPU
    else:
        with pytest.raises(ValueError, match=rf"^--device: auto \(cuda:{count}, from LOCAL_RANK\) requested"):
            resolve_device("auto")
    with pytest.raises(ValueError, match=rf"^--device: cuda \(cuda:{count}, from LOCAL_RANK\) requested"):
        resolve_device("cuda")


def test_train_rejects_a_missing_gpu_in_set_too(capsys):
    from more_fast.cli import config_from_args

    with pytest.raises(SystemExit) as exc:
        config_from_args(["--set", f"device={MISSING_GPU}"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: --device: ") and f"{MISSING_GPU} requested" in last, last


@pytest.mark.parametrize("script, flag", [("train", "--cam-scales"), ("infer", "--scales")])
@pytest.mark.parametrize("value", ["0,1", "1,-0.5", "1,,2", "a", "1,nan", ""])
def test_cam_scales_must_be_positive_numbers(script, flag, value):
    parser, required = _parsers()[script]
    last = _parse_error(parser, required + [flag, value])
    assert last == f"{script}.py: error: argument {flag}: expected comma-separated numbers > 0, got {value or 'nothing'}", last
    assert parser.parse_args(required + [flag, "1.0,0.5,1.25"]).__dict__[flag[2:].replace("-", "_")] == (1.0, 0.5, 1.25)


@pytest.mark.parametrize("script", ["train", "evaluate", "infer"])
def test_help_states_every_default(script):
    parser, _ = _parsers()[script]
    for action in parser._actions:
        if action.required or action.dest == "help":
            continue
        assert "default" in (action.help or ""), f"{script}.py {action.option_strings}: no default in the help"
    text = parser.format_help()
    assert "default: auto" in " ".join(text.split())


def test_train_help_reads_the_recipes():
    from more_fast.cli import build_parser
    from more_fast.training.config import RECIPES, TrainConfig

    text = " ".join(build_parser().format_help().split())
    iters = [RECIPES[d].get("iters", TrainConfig.iters) for d in ("synthetic", "voc", "coco")]
    assert f"default: {iters[0]} (synthetic), {iters[1]} (voc), {iters[2]} (coco)" in text
    assert (TrainConfig.depth, TrainConfig.patch_size) == (4, 8)
    assert "number of ViT blocks (default: 4 (synthetic), the named model's (voc), the named model's (coco))" in text
    assert "ViT patch size (default: 8 (synthetic), the named model's (voc), the named model's (coco))" in text
    assert "<lambda>" not in text


@pytest.mark.parametrize("argv, message", [
    (["--iters", "x"], "argument --iters: expected a positive integer, got x"),
    (["--workers", "two"], "argument --workers: expected an integer >= 0, got two"),
    (["--seed", "abc"], "argument --seed: expected an integer, got abc"),
    (["--eval-bkg", "1.5"], "argument --eval-bkg: expected a number in [0, 1], got 1.5"),
])
def test_train_flag_messages_are_readable(argv, message):
    from more_fast.cli import build_parser

    last = _parse_error(build_parser(), argv)
    assert last == f"train.py: error: {message}", last
