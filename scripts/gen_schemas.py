"""Write the wire messages' JSON Schemas and schemas/README.md (run after changing models).

    .venv/bin/python scripts/gen_schemas.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuheal.schemas import write_schemas

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    for path in write_schemas(ROOT / "schemas"):
        print(path.relative_to(ROOT))
