"""The tree says where things are: each wing of dpcore imports only the wings below it (ARCHITECTURE.md),
and no engine module imports streamlit or the pages."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own wing and the wings listed before it, never one after it.
WINGS = [
    ("base", ["dpcore.errors", "dpcore.process"]),
    ("data", ["dpcore.data"]),
    ("models", ["models"]),
    ("environment", ["dpcore.environment"]),
    ("privacy", ["dpcore.privacy"]),
    ("config", ["dpcore.config"]),
    ("store", ["dpcore.store"]),
    ("training", ["dpcore.training"]),
    ("analysis", ["dpcore.analysis"]),
    ("figures", ["dpcore.figures"]),
    ("cli", ["dpcore.cli", "dpcore.__main__"]),
]
PACKAGE_ROOTS = {"dpcore", "dpcore.__init__"}  # the package itself: a docstring, no imports


def wing_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(WINGS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every import in the file, at any depth (imports inside functions count too), made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]  # `from dpcore import ledger`
    return out


def engine_files() -> list[Path]:
    return sorted(list((ROOT / "dpcore").rglob("*.py")) + list((ROOT / "models").rglob("*.py")))


def test_every_engine_module_belongs_to_a_wing():
    lost = [module_name(p) for p in engine_files()
            if module_name(p) not in PACKAGE_ROOTS and wing_of(module_name(p)) is None]
    assert not lost, f"modules outside every wing (give them one in ARCHITECTURE.md and here): {lost}"


def test_no_import_runs_upward():
    upward = []
    for path in engine_files():
        src = wing_of(module_name(path))
        if src is None:
            continue
        for line, target in imports_of(path):
            dst = wing_of(target)
            if dst is not None and dst > src:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({WINGS[src][0]}) imports {target} ({WINGS[dst][0]})")
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(set(upward)))


def test_the_engine_never_imports_streamlit_or_the_pages():
    bad = [f"{p.relative_to(ROOT)}:{line} {t}" for p in engine_files() for line, t in imports_of(p)
           if t.split(".")[0] in ("streamlit", "pages", "app")]
    assert not bad, bad


def test_pages_are_views_of_at_most_150_lines():
    """A page draws and calls the engine; what it would compute belongs to a wing (ARCHITECTURE.md)."""
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "pages").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 150}
    assert not long, f"pages longer than 150 lines (move what they compute to the engine): {long}"


def test_pages_reach_the_engine_only_through_dpcore_and_models():
    """No page trains, clips or accounts by itself: torch and opacus stay behind the engine's functions."""
    bad = [f"{p.relative_to(ROOT)}:{line} {t}" for p in sorted((ROOT / "pages").rglob("*.py"))
           for line, t in imports_of(p) if t.split(".")[0] in ("torch", "opacus", "dp_accounting")]
    assert not bad, bad
