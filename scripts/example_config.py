"""Write gpuheal.example.toml from the config models (run after changing the config).

    .venv/bin/python scripts/example_config.py
"""

from __future__ import annotations

from pathlib import Path

from gpuheal.config.example import render

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "gpuheal.example.toml"
    target.write_text(render())
    print(f"wrote {target}")
