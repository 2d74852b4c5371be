"""lm-eval's minerva_math, scored by lm-eval's own code, beside Hydra's antlr4 pin.

The conflict: lm-eval 0.4.13's ``lm_eval/tasks/minerva_math/utils.py`` asserts ``antlr4-python3-runtime`` 4.11 at
import, and its ``exact_match`` parses answers with ``sympy.parsing.latex.parse_latex``, whose generated parser
needs the 4.11 runtime (sympy checks the version at every call); hydra-core 1.3 and omegaconf 2.3 pin 4.9.3, and
their own generated grammars cannot load under 4.11 ("Could not deserialize ATN"). One interpreter cannot import
both versions under the one name ``antlr4`` at once.

The decision: **lm-eval's minerva_math code runs unchanged**, with the 4.11 runtime swapped in only while it
runs. ``antlr4-python3-runtime==4.11.0`` (lm-eval[math]'s own pin) is installed with ``pip --target`` into a
directory of its own (``<cache>/python/antlr4-python3-runtime-4.11.0``, or the mirror's ``python/`` directory
that ``python -m posttrain.sweep prefetch`` fills for air-gapped nodes; fetched from PyPI on first use where PyPI
is reachable). :func:`antlr_4_11` then, for the duration of one ``simple_evaluate`` over minerva_math: takes the
4.9.3 world out of ``sys.modules`` (``antlr4``, ``sympy.parsing.latex``, ``latex2sympy2_extended``,
``math_verify``), puts that directory first on ``sys.path`` (so ``import antlr4`` and
``importlib.metadata.version`` both see 4.11, exactly as in an environment where lm-eval[math] is installed),
checks that sympy really parses LaTeX with it, and afterwards puts the 4.9.3 world back (the 4.11 modules are
kept aside for the next window). Hydra and OmegaConf bound their antlr4 classes when they were imported, so they
keep working inside and after the window (tested). Both of lm-eval's metrics, ``exact_match`` and
``math_verify``, therefore have lm-eval's names and lm-eval's values.

Rejected: ``math-verify[antlr4_9_3]`` alone (it is a dependency, so math_verify's own parser works under 4.9.3)
cannot run lm-eval's ``exact_match``, which needs sympy's 4.11 parser; replacing that parser would change the
metric, and a renamed variant would not be the study's number. Outside the window lm-eval's minerva_math fails
loudly (its import-time assertion, sympy's ImportError), never by scoring 0.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from posttrain.mirror import PREFETCH_HINT, python_dir

DIST = "antlr4-python3-runtime"
VERSION = "4.11.0"  # lm-eval[math]: antlr4-python3-runtime==4.11
#: Modules whose import binds an antlr4 runtime: swapped as one world.
SWAPPED = ("antlr4", "sympy.parsing.latex", "latex2sympy2_extended", "math_verify")
#: lm-eval task directories whose code imports the 4.11 runtime.
TASK_DIRS = ("minerva_math",)

_lock = threading.RLock()
_worlds: dict[str, dict] = {}  # runtime directory -> its modules, kept between windows once they passed the check


class MathRuntimeError(ValueError):
    """The 4.11 runtime cannot be found, fetched or used; one line naming the fix."""


def installed(where: Path) -> bool:
    """``where`` holds the runtime (its package and its dist-info)."""
    return (where / "antlr4" / "__init__.py").is_file() and \
        (where / f"{DIST.replace('-', '_')}-{VERSION}.dist-info").is_dir()


def cache_dir() -> Path:
    from posttrain.cache import cache_root

    return cache_root() / "python" / f"{DIST}-{VERSION}"


def locate(mirror: str | None = None) -> Path | None:
    """The runtime directory: the mirror's, else the cache's; None when neither holds it."""
    candidates = ([python_dir(mirror, DIST, VERSION)] if mirror else []) + [cache_dir()]
    return next((c for c in candidates if installed(c)), None)


def pip_install(target: Path) -> None:
    """``pip install --no-deps --target`` of the runtime into ``target`` (a fresh directory). MathRuntimeError."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--quiet", "--target", str(target), f"{DIST}=={VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MathRuntimeError(f"pip could not fetch {DIST}=={VERSION} ({type(exc).__name__})") from None
    if proc.returncode != 0 or not installed(target):
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise MathRuntimeError(f"pip could not fetch {DIST}=={VERSION} ({lines[-1].strip() if lines else 'no output'})")


def ensure(mirror: str | None = None) -> Path:
    """The runtime directory, fetched into the cache from PyPI on first use; MathRuntimeError (one line)."""
    found = locate(mirror)
    if found is not None:
        return found
    from posttrain.cache import cached_dir

    try:
        where = cached_dir("python", f"{DIST}-{VERSION}", pip_install)
    except MathRuntimeError as exc:
        where_mirror = f"{python_dir(mirror, DIST, VERSION)} or " if mirror else ""
        raise MathRuntimeError(
            f"lm-eval's minerva_math needs {DIST}=={VERSION} beside Hydra's antlr4 4.9.3, expected in "
            f"{where_mirror}{cache_dir()}: {exc}; run `{PREFETCH_HINT}` where PyPI is reachable") from None
    return where


def _owned(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in SWAPPED)


def _take_world() -> dict:
    world = {n: m for n, m in sys.modules.items() if _owned(n)}
    for name in world:
        del sys.modules[name]
    return world


def _bind_parents(world: dict) -> None:
    """Point the attribute of each package outside the world at the world's module (``sympy.parsing.latex``).
    Attributes inside a world are left alone: ``antlr4.Token`` is the class, not the submodule."""
    for name, module in world.items():
        parent, _, child = name.rpartition(".")
        if parent and not _owned(parent) and parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def _self_check(where: Path) -> None:
    from importlib.metadata import version

    found = version(DIST)
    if found != VERSION:
        raise MathRuntimeError(f"{where}: importlib.metadata sees {DIST} {found}, not {VERSION}")
    try:
        import sympy
        from sympy.parsing.latex import parse_latex

        ok = sympy.simplify(parse_latex(r"\frac{1}{2}") - sympy.Rational(1, 2)) == 0  # as lm-eval's is_equiv
    except Exception as exc:  # noqa: BLE001 - reported as the one line below
        raise MathRuntimeError(f"{where}: sympy cannot parse LaTeX with this antlr4 runtime "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not ok:
        raise MathRuntimeError(rf"{where}: sympy parsed \frac{{1}}{{2}} wrongly with this antlr4 runtime")


@contextmanager
def antlr_4_11(where: Path) -> Iterator[None]:
    """Run the body with antlr4 4.11 (from ``where``) as ``antlr4``; the 4.9.3 world is back afterwards."""
    entry = str(where)
    with _lock:
        saved = _take_world()
        sys.path.insert(0, entry)
        importlib.invalidate_caches()
        cached = _worlds.pop(entry, None)
        if cached is not None:
            sys.modules.update(cached)
            _bind_parents(cached)
        checked = False
        try:
            _self_check(where)
            checked = True
            yield
        finally:
            world = _take_world()
            if checked:
                _worlds[entry] = world
            while entry in sys.path:
                sys.path.remove(entry)
            sys.modules.update(saved)
            _bind_parents(saved)
            for name, module in world.items():  # first imported inside: no attribute left pointing at it
                parent, _, child = name.rpartition(".")
                if name not in saved and parent and not _owned(parent) and parent in sys.modules \
                        and getattr(sys.modules[parent], child, None) is module:
                    delattr(sys.modules[parent], child)
            importlib.invalidate_caches()


@contextmanager
def scoring(mirror: str | None = None) -> Iterator[None]:
    """:func:`antlr_4_11` with the runtime found (or fetched) by :func:`ensure`."""
    with antlr_4_11(ensure(mirror)):
        yield


if __name__ == "__main__":  # `python -m posttrain.evaluate.math_runtime`: fetch it now (setup scripts)
    try:
        print(ensure())
    except MathRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
