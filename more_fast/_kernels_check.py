"""Refuse to run when `import kernels` would load another project's `kernels` package.

more_fast's fused ops live in a top-level package named `kernels`; PyPI's `kernels` distribution
installs a package under the same name. Whichever comes first on sys.path wins, and with the
other one the failure would surface much later as a confusing AttributeError. The check reads
the candidate's source for the marker line that kernels/__init__.py carries instead of importing
it, so another project's package is never executed by it.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

MARKER = "__more_fast__ = True"


def _owners(top_level: str) -> list[str]:
    """'name version' of every installed distribution that ships `top_level`, ours excluded."""
    from importlib import metadata

    names = metadata.packages_distributions().get(top_level, [])
    owners = []
    for name in dict.fromkeys(names):
        if name.replace("-", "_").lower() == "more_fast":
            continue
        try:
            owners.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            owners.append(name)
    return owners


def _is_ours() -> tuple[bool, str]:
    """(whether `kernels` resolves to more_fast's package, where it resolves)."""
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        return bool(getattr(loaded, "__more_fast__", False)), str(getattr(loaded, "__file__", None) or loaded)
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return False, "nowhere (no package named kernels is importable)"
    where = spec.origin if spec.origin not in (None, "namespace") else str(list(spec.submodule_search_locations or []))
    try:
        source = spec.loader.get_source("kernels") if spec.loader is not None else None
    except (ImportError, OSError):
        source = None
    if source is None:
        # no source to read (bytecode-only install): accept the copy installed beside more_fast
        here = pathlib.Path(__file__).resolve().parent.parent
        return spec.origin is not None and pathlib.Path(spec.origin).resolve().parent.parent == here, where
    return any(line.strip().startswith(MARKER) for line in source.splitlines()), where


def check_kernels_package() -> None:
    ours, where = _is_ours()
    if ours:
        return
    owners = _owners("kernels")
    by = f" (installed by the distribution {', '.join(repr(o) for o in owners)})" if owners else ""
    fix = (f"uninstall it (pip uninstall {owners[0].split()[0]}) or give more_fast its own virtual environment"
           if owners else "put more_fast's repository (or its installed copy) first on sys.path")
    raise ImportError(
        f"more_fast: `import kernels` resolves to {where}{by}, not more_fast's own kernels package; {fix}"
    )
