"""The layout is the architecture: imports point one way (app and ui -> viz -> sd_parts), the model
package needs no UI or plotting library, and no file grows long without saying why."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LONG = 440  # lines: a file past about 400 says at its top why it is one file
FORBIDDEN = {
    # package: top-level modules that importing all of it must not load, in the import order
    "sd_parts": ["gradio", "matplotlib", "PIL", "viz", "ui", "app"],
    "viz": ["gradio", "ui", "app"],
    "ui": ["app"],
}
SCRIPT = """
import importlib, json, sys
loaded = {}
for package, names in json.loads(sys.argv[1]).items():
    for name in names:
        importlib.import_module(name)
    loaded[package] = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps(loaded))
"""


def modules_of(package: str) -> list[str]:
    folder = ROOT / package
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in folder.rglob("*.py")
    )


def test_imports_point_one_way() -> None:
    """In a fresh interpreter, import every module of sd_parts, then of viz, then of ui; after
    each package, none of the modules it must not depend on is loaded."""
    packages = {package: modules_of(package) for package in FORBIDDEN}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(packages)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    for package, forbidden in FORBIDDEN.items():
        assert package in loaded[package]
        assert set(loaded[package]).isdisjoint(forbidden), (
            f"importing {package} loads {sorted(set(loaded[package]) & set(forbidden))}")


def source_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split() if (ROOT / name).is_file()]


def test_long_files_say_why() -> None:
    """A source file over about 400 lines states, in its module docstring, why it is one file:
    a paragraph that starts "Length:"."""
    unexplained = []
    for path in source_files():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") <= LONG:
            continue
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if "Length:" not in docstring:
            unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not unexplained, (
        f"over {LONG} lines with no 'Length:' paragraph in the module docstring saying why: "
        f"{', '.join(unexplained)}; split the file or say why it is one")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file: at the top, inside a function, or
    under ``if TYPE_CHECKING:`` (a type-only import is a dependency too)."""
    names = set()
    package = ".".join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_tabs_stand_alone() -> None:
    """A tab imports ui's shared modules, its sections, viz and sd_parts: never app.py and
    never another tab. A section never imports a tab, and the shared modules import neither."""
    tabs = {path.stem for path in (ROOT / "ui" / "tabs").glob("*.py")} - {"__init__"}
    problems = []
    for path in sorted((ROOT / "ui").rglob("*.py")):
        here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in imported_modules(path):
            top = name.split(".")[0]
            other_tab = name.startswith("ui.tabs.") and name.split(".")[2] in tabs \
                and name != here
            if top == "app" or other_tab or (
                    not here.startswith("ui.tabs") and name.startswith("ui.tabs")) or (
                    not here.startswith(("ui.tabs", "ui.sections"))
                    and name.startswith("ui.sections.")):
                problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not problems, "; ".join(problems)
    for package, forbidden in (("sd_parts", ("gradio", "matplotlib", "PIL", "viz", "ui", "app")),
                               ("viz", ("gradio", "ui", "app"))):
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = {n for n in imported_modules(path) if n.split(".")[0] in forbidden}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_test_files_share_through_helpers() -> None:
    """What tests share is in tests/helpers (and the fixtures of tests/conftest.py): a test
    file imports no other test file, so each can be read, moved or deleted on its own."""
    problems = [f"{path.relative_to(ROOT)} imports {name}"
                for path in sorted((ROOT / "tests").rglob("test_*.py"))
                for name in imported_modules(path)
                if name.startswith("tests.") and not name.startswith("tests.helpers")]
    assert not problems, "; ".join(problems)
