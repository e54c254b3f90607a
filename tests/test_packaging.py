"""Installation edge cases, each in a fresh interpreter: no triton, and a foreign `kernels`."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, pythonpath, cwd, **env) -> subprocess.CompletedProcess:
    """`python -c code`; run from outside the repository, whose root `-c` would put first on sys.path."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MORE_FAST_KERNELS", "PYTHONPATH")}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


# Every op on fresh random inputs, through the public API and through kernels.reference (which has
# no defaults: every argument is passed).
_OPS_WITHOUT_TRITON = """
    import sys
    sys.modules["triton"] = None  # `import triton` now raises ModuleNotFoundError, as where it is not installed
    import importlib.util, torch
    try:
        import triton  # noqa: F401
        raise SystemExit("the block did not hold: triton imported")
    except ModuleNotFoundError:
        pass
    import kernels
    from kernels import reference as ref

    torch.manual_seed(1)
    b, k, n, d = 2, 3, 10, 8
    tok = torch.randn(b, n, d)
    lab = torch.randint(0, k + 1, (b, n))
    lab[0, 0] = 255
    cls = torch.randn(b, k, d)
    cls_lab = torch.tensor([[1, 0, 1], [1, 1, 0]])
    h, e = torch.randn(b, k, d), torch.randn(b, k + n, d)
    q, kk = torch.randn(b, 2, 1 + k + n, d), torch.randn(b, 2, 1 + k + n, d)
    img, masks = torch.rand(b, 3, 9, 7) * 255, torch.rand(b, 2, 9, 7)
    probs, gate = torch.rand(b, 3, 9, 7).softmax(1), torch.rand(b, 9, 7)
    cases = {
        "affinity_loss": ((tok, lab, 255), {}),
        "lir_loss": ((cls, tok, lab, cls_lab, 0.5), {}),
        "gcr_aggregate": ((h, e, 2, "published"), {}),
        "class_patch_attention": ((q, kk, 1, k, "mean_softmax"), {}),
        "par_refine": ((img, masks), {"dilations": (1, 2), "num_iter": 3, "affinity_storage": "fp32"}),
        "dense_energy_loss": ((img, probs, gate, 15.0, 50.0), {}),
    }
    assert not any(kernels.triton_available(op) for op in cases), "a Triton op loaded without triton"
    for op, (args, kw) in cases.items():
        assert kernels.resolve_backend(op, torch.device("cpu")) == "reference", op
        got, want = getattr(kernels, op)(*args, **kw), getattr(ref, op)(*args, **kw)
        assert torch.equal(got, want), op
    print("ran on the reference:", ",".join(cases))
"""


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_backend_runs_the_reference_without_triton(interpret, tmp_path):
    res = _run(_OPS_WITHOUT_TRITON, [ROOT], tmp_path, TRITON_INTERPRET=interpret)
    assert res.returncode == 0, res.stderr
    assert "ran on the reference: affinity_loss,lir_loss,gcr_aggregate" in res.stdout


def test_forced_triton_backend_says_triton_is_missing(tmp_path):
    code = """
        import sys
        sys.modules["triton"] = None
        import torch, kernels
        try:
            with kernels.use_backend("triton"):
                kernels.affinity_loss(torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long))
        except NotImplementedError as err:
            print("error:", err)
        try:
            kernels.choose_backend("triton", "cpu")  # the scripts' --kernels triton, before any work
        except ValueError as err:
            print("error:", err)
    """
    res = _run(code, [ROOT], tmp_path, TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stderr
    assert "error: affinity_loss: no Triton implementation is available" in res.stdout
    assert "error: kernels: 'triton' needs the triton package, which is not installed here" in res.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed here")
def test_triton_ops_load_when_triton_is_present(tmp_path):
    """The control of the tests above: without the block the same interpreter loads the Triton ops."""
    res = _run("import kernels; print([op for op in kernels.OPS if kernels.triton_available(op)])", [ROOT], tmp_path,
               TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stderr
    assert "affinity_loss" in res.stdout and "dense_energy_loss" in res.stdout


def _fake_kernels(tmp_path: pathlib.Path) -> pathlib.Path:
    """A site directory holding another project's `kernels` package and its dist-info."""
    site = tmp_path / "site"
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    # executing it would print this line: the check must read it, never run it
    (pkg / "__init__.py").write_text('print("FOREIGN KERNELS EXECUTED")\n__version__ = "0.4.0"\n')
    info = site / "kernels-0.4.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.4.0\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\n")
    return site


def test_import_fails_when_kernels_is_another_distribution(tmp_path):
    site = _fake_kernels(tmp_path)
    res = _run("import more_fast", [site, ROOT], cwd=tmp_path)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: more_fast: `import kernels` resolves to "), res.stderr
    assert str(site / "kernels" / "__init__.py") in last
    assert "'kernels 0.4.0'" in last and "pip uninstall kernels" in last, last
    assert "FOREIGN KERNELS EXECUTED" not in res.stdout


def test_import_fails_when_the_foreign_kernels_was_imported_first(tmp_path):
    site = _fake_kernels(tmp_path)
    res = _run("import kernels\nimport more_fast", [site, ROOT], cwd=tmp_path)
    assert res.returncode != 0
    assert "not more_fast's own kernels package" in res.stderr.strip().splitlines()[-1], res.stderr


def test_import_succeeds_with_our_kernels_first(tmp_path):
    site = _fake_kernels(tmp_path)
    res = _run("import more_fast, kernels; print(kernels.__file__)", [ROOT, site], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(str(ROOT / "kernels" / "__init__.py"))


def test_triton_is_required_on_linux_only():
    """pip evaluates these markers: without them `pip install` fails where triton has no wheels."""
    import tomllib

    from packaging.requirements import Requirement

    deps = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]

    def needed(platform):
        env = {"sys_platform": platform, "platform_system": platform.capitalize()}
        return {r.name for r in deps if r.marker is None or r.marker.evaluate(env)}

    assert "triton" in needed("linux")
    for platform in ("darwin", "win32"):
        assert "triton" not in needed(platform) and {"torch", "timm", "nvidia-ml-py"} <= needed(platform)
