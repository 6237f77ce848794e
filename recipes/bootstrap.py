"""Imported first by every recipe and benchmark: puts the repository root and recipes/ on sys.path.

`python recipes/nft_flux.py` and `ray job submit --working-dir . -- python recipes/nft_flux.py` (on a cluster
where the package is not installed) put only the script's folder on the path; the `actors` and `rlstitch`
packages and the recipe modules (`driver`, `nft_flux`, ...) are found through the two entries added here.
benchmarks/bootstrap.py is a link to this file, so the insertion exists once.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # resolve(): through benchmarks/bootstrap.py's link too
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"  # recipes/configs/<recipe>/<name>.yaml

for entry in (str(RECIPES), str(ROOT)):  # ROOT ends up first: the packages win over same-named scripts
    if entry not in sys.path:
        sys.path.insert(0, entry)
