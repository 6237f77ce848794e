"""Prompt lists: the tiny world's captions or a text file, for training, evaluation and inference alike."""

from __future__ import annotations

from pathlib import Path

from rlstitch.config import ConfigError
from rlstitch.data import scenes

TINY = "tiny:"  # "tiny:<split>": the split's distinct captions in index order


def load_prompts(source: str, n: int | None = None, cycle: bool = False) -> list[str]:
    """Prompts from "tiny:<split>" (distinct tiny-world captions in index order; "" is "tiny:test", the
    held-out captions) or a text file (one per line, blank lines skipped): the first n (default: all of a
    file, 512 captions). cycle=True repeats a file's prompts until there are n; an empty file is an error."""
    source = source or f"{TINY}test"
    if source.startswith(TINY):
        split = source.split(":", 1)[1]
        want, seen, i = n or 512, {}, 0
        limit = scenes.SPLIT_SIZES[split] or 10**9
        while len(seen) < want and i < limit:
            seen.setdefault(scenes.sample(i, split).caption, None)
            i += 1
        return list(seen)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} not found (or use tiny:train / tiny:test)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if cycle:
        if not prompts:
            raise ConfigError(f"prompts={source!r} holds no prompts")
        prompts = prompts * (-(-n // len(prompts)))
    return prompts[:n] if n else prompts
