"""The modules a ``.py`` plug-in imports from beside it.

A plug-in file's folder is put on Python's module search path (at its end) when it loads, so the
plug-in imports the modules beside it as ``python my_method.py`` would (``from my_helpers import
f``, a package ``helpers/`` below it). Which of them a plug-in uses is read from the import
statements of its file, and of those modules in turn, wherever they stand (in a function too):

- ``local_modules(file)``: module name -> file, for every module of a plug-in folder that ``file``
  imports, directly or through one another. Their sources enter the id of every component defined
  in ``file`` (``wmbench.grid.content_identity``): editing a helper re-runs the cells of the
  components that use it, and editing another file re-runs nothing.
- ``shadowing_problem(file)``: a module beside the plug-in that the plug-in imports but Python
  would not load from there, because the name is taken (a standard-library module such as
  ``random``, an installed one, a module already loaded from another folder): refused, naming both
  files, rather than left to fail in the plug-in or to run another module's code.

An import by a computed name (``importlib.import_module(name)``) is not seen: such a module's edits
need a ``version`` bump, like those of an installed package.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

# Real paths of the folders of the .py plug-ins loaded in this process.
PLUGIN_FOLDERS: set[str] = set()


@functools.lru_cache(maxsize=1024)
def _real(path: str) -> str:
    return os.path.realpath(path or ".")


def add_folder(folder: Path) -> None:
    """Put a plug-in's folder on the module search path (at its end, so it takes no name of an
    installed or standard-library module: ``shadowing_problem`` refuses those), once."""
    real = _real(str(folder))
    PLUGIN_FOLDERS.add(real)
    if not any(_real(p) == real for p in sys.path if isinstance(p, str)):
        sys.path.append(real)
        importlib.invalidate_caches()


def plugin_roots() -> list[str]:
    """The plug-in folders on the module search path, in its order (where Python looks first)."""
    out: list[str] = []
    for entry in sys.path:
        real = _real(entry) if isinstance(entry, str) else None
        if real in PLUGIN_FOLDERS and real not in out:
            out.append(real)
    return out


@functools.lru_cache(maxsize=1024)
def _import_statements(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """(level, module, names) of every import statement of a source file (cached while its mtime
    and size stay the same); none for a file that does not parse (its import fails anyway)."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), path)
    except (SyntaxError, ValueError, OSError):
        return ()
    out: list[tuple[int, str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", tuple(a.name for a in node.names if a.name != "*")))
    return tuple(out)


def import_statements(path: str) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    try:
        stat = os.stat(path)
    except OSError:
        return ()
    return _import_statements(path, stat.st_mtime_ns, stat.st_size)


def _find_one(part: str, dirs: list[str]) -> tuple[str | None, list[str]] | None:
    """(file, package folders) of the module ``part`` in ``dirs`` as Python's path finder finds it:
    the first package (``part/__init__.py``) or module (``part.py``), else a namespace package of
    every folder ``part`` (file None); None when there is none."""
    namespace = []
    for folder in dirs:
        base = os.path.join(folder, part)
        init = os.path.join(base, "__init__.py")
        if os.path.isfile(init):
            return init, [base]
        if os.path.isfile(base + ".py"):
            return base + ".py", []
        if os.path.isdir(base):
            namespace.append(base)
    return (None, namespace) if namespace else None


def find_local(name: str, roots: list[str]) -> str | None:
    """The source file of the dotted module ``name`` among the plug-in folders ``roots`` (a
    package's ``__init__.py``); None when it is not there or is a namespace package."""
    search, found = roots, None
    for part in name.split("."):
        if not part.isidentifier() or not search:
            return None
        found = _find_one(part, search)
        if found is None:
            return None
        search = found[1]
    return found[0] if found else None


def _root(file: str, roots: list[str]) -> str | None:
    """The plug-in folder (of ``roots``) that ``file`` lies in, or below; None outside them."""
    return next((root for root in roots if file.startswith(root.rstrip(os.sep) + os.sep)), None)


def _package(file: str, roots: list[str]) -> str | None:
    """The dotted package a file of a plug-in folder belongs to ("" at the folder's top, where a
    relative import fails); None outside the folders."""
    root = _root(file, roots)
    if root is None:
        return None
    rel = os.path.relpath(file, root)
    parts = rel[: -len(".py")].split(os.sep) if rel.endswith(".py") else rel.split(os.sep)
    return ".".join(parts[:-1])  # a package's __init__ is in its own package, a module in its parent's


def _imported_names(level: int, module: str, names: tuple[str, ...], package: str | None) -> list[str]:
    """The absolute module names an import statement may load: each parent package, the module,
    and for ``from M import x`` the submodule ``M.x`` (when ``x`` is one)."""
    if level:
        if not package:
            return []
        parts = package.split(".")
        if level - 1 >= len(parts):
            return []
        base = parts[: len(parts) - (level - 1)]
        full = ".".join(base + ([module] if module else []))
    else:
        full = module
    if not full:
        return []
    pieces = full.split(".")
    out = [".".join(pieces[: i + 1]) for i in range(len(pieces))]
    return out + [f"{full}.{n}" for n in names]


def local_modules(file: str) -> dict[str, str]:
    """Module name -> source file of every module of a plug-in folder that ``file`` imports,
    directly or through one another (``file`` itself left out); empty for a file outside the
    plug-in folders (an installed module: its edits need a ``version`` bump)."""
    roots = plugin_roots()
    if not roots or _package(_real(file), roots) is None:
        return {}
    start = _real(file)
    seen, todo, out = {start}, [start], {}
    while todo:
        current = todo.pop()
        package = _package(current, roots)
        for level, module, names in import_statements(current):
            for name in _imported_names(level, module, names, package):
                found = find_local(name, roots)
                if found is None:
                    continue
                real = _real(found)
                if real not in seen:
                    seen.add(real)
                    out[name] = found
                    todo.append(real)
    return dict(sorted(out.items()))


def _top_names(file: str) -> set[str]:
    """The top-level module names the absolute import statements of ``file`` name."""
    return {module.split(".")[0] for level, module, _ in import_statements(file) if level == 0 and module}


def shadowing_problem(file: str) -> str | None:
    """Why a module that ``file`` (or a module beside it that it imports) imports by a name its own
    plug-in folder holds would not be the one Python loads under that name, or None."""
    roots = plugin_roots()
    importers: dict[str, str] = {}  # top-level name -> the first file importing it
    for importer in [_real(file), *(_real(f) for f in local_modules(file).values())]:
        for name in sorted(_top_names(importer)):
            importers.setdefault(name, importer)
    for name, importer in sorted(importers.items()):
        own = _root(importer, roots)
        local = find_local(name, [own]) if own else None  # the module of that name in the importer's own folder
        if local is None:
            continue
        try:
            spec = importlib.util.find_spec(name)  # a top-level name: imports nothing
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        origin = spec.origin if spec.has_location else None
        if origin is not None and _real(origin) == _real(local):
            continue
        mine = local.removesuffix(os.sep + "__init__.py")  # a package: its folder
        if name in sys.stdlib_module_names:
            kind = "a standard-library module"
        elif origin is not None and any(_real(origin).startswith(root + os.sep) for root in roots):
            kind = "a module beside another plug-in"
        elif origin is not None and ("site-packages" in origin or "dist-packages" in origin):
            kind = "an installed module"
        else:
            kind = "another module"
        where = origin or f"built into Python ({spec.origin or 'built in'})"
        via = "" if importer == _real(file) else f" (through {importer})"
        return (f"imports {name}{via}: {mine} is named so, but the name is taken by {kind}, {where}, "
                f"which is what the import loads; rename {os.path.basename(mine)} and the imports of it")
    return None


def imported_as(path: Path) -> str | None:
    """The plain module name under which an import statement in a plug-in folder would load the
    plug-in file ``path`` itself (its stem), or None when that name would load another module."""
    name = path.stem
    if not name.isidentifier() or name in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None and spec.has_location else None
    return name if origin is not None and _real(origin) == _real(str(path)) else None
