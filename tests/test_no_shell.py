"""No shell anywhere: every command the code runs is an argv list (AST scan of the source).

A shell would turn a host name, a model name or any other text that came off the wire into
a command line. The scan finds ``shell=`` with anything but a literal ``False`` and every use
of the functions that always run a shell, however they are imported or renamed.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO

SOURCE_DIRS = ("gpuheal", "publisher", "analyzer", "healer", "recorder", "dashboard")
SHELL_FUNCTIONS = frozenset({
    ("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"), ("asyncio", "create_subprocess_shell"),
    ("pty", "spawn"),
})
"""(module, function): each always hands its argument to ``/bin/sh``."""
SHELL_MODULES = frozenset(module for module, _ in SHELL_FUNCTIONS)


def shell_uses(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: what`` for every ``shell=`` other than ``False`` and every use of a
    function of :data:`SHELL_FUNCTIONS` in one Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: dict[str, str] = {}
    """Local name → module (``import os as o``)."""
    functions: dict[str, tuple[str, str]] = {}
    """Local name → (module, function) (``from os import popen as p``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in SHELL_MODULES:
                    modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in SHELL_MODULES:
            for alias in node.names:
                if (node.module, alias.name) in SHELL_FUNCTIONS:
                    functions[alias.asname or alias.name] = (node.module, alias.name)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.keyword) and node.arg == "shell" and not (
                isinstance(node.value, ast.Constant) and node.value.value is False):
            found.append(f"{where}: shell={ast.unparse(node.value)}")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and (modules.get(node.value.id), node.attr) in SHELL_FUNCTIONS):
            found.append(f"{where}: {modules[node.value.id]}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in functions:
            found.append(f"{where}: {'.'.join(functions[node.id])}")
    return found


def test_no_shell_anywhere() -> None:
    files = {d: sorted((REPO / d).rglob("*.py")) for d in SOURCE_DIRS}
    assert all(files.values()), {d: len(f) for d, f in files.items()}  # every tree scanned
    found = [hit for paths in files.values() for path in paths for hit in shell_uses(path)]
    assert not found, "shell use in the source tree:\n" + "\n".join(found)


def test_the_scan_finds_every_way_to_a_shell(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import os, subprocess\n"
        "import os as o\n"
        "import asyncio\n"
        "from os import popen as p\n"
        "from subprocess import getstatusoutput\n"
        "subprocess.run('ls', shell=True)\n"          # 1
        "subprocess.Popen(['ls'], shell=flag)\n"      # 2
        "os.system('ls')\n"                           # 3
        "o.system('ls')\n"                            # 4
        "p('ls')\n"                                   # 5
        "subprocess.getoutput('ls')\n"                # 6
        "getstatusoutput('ls')\n"                     # 7
        "asyncio.create_subprocess_shell('ls')\n"     # 8
        "subprocess.run(['ls'], shell=False)\n"       # fine: an argv, no shell
        "os.path.join('a', 'b')\n"                    # fine: not a shell function
        "system = 'x'\n")                             # fine: not os.system
    found = shell_uses(sample, tmp_path)
    assert sorted(int(hit.split(":")[1]) for hit in found) == list(range(6, 14)), found
