"""Sampler plumbing: outputs are never half-written, and gathering chunks cannot hang."""

from __future__ import annotations

import time

import pytest
import torch


def test_write_outputs_leaves_no_half_written_image(tmp_path, monkeypatch):
    import torchvision.utils

    from actors.sampler import write_outputs

    results = [{"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "reward": [0.1, 0.3]}]
    summary = write_outputs(tmp_path, ["a", "b"], [0, 1], results, {})
    assert (tmp_path / "images.png").stat().st_size > 0 and summary["reward_mean"] == pytest.approx(0.2)
    before = (tmp_path / "images.png").read_bytes()

    def crash(images, fp, **kw):  # the process dies halfway through the PNG
        with open(fp, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError("disk full")

    monkeypatch.setattr(torchvision.utils, "save_image", crash)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(tmp_path, ["a", "b"], [0, 1], results, {})
    assert (tmp_path / "images.png").read_bytes() == before  # the previous complete file survives
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_run_chunks_times_out_with_a_clear_error(ray_local):
    import ray

    from actors.sampler import run_chunks

    @ray.remote(num_cpus=0)
    class Stuck:
        def dps(self, prompts, seeds, opts):
            time.sleep(60)

    worker = Stuck.remote()
    try:
        with pytest.raises(TimeoutError, match=r"no prompt chunk finished within 0\.5 s \(chunks left: \[0, 1\]\)"):
            run_chunks([worker], "dps", ["a", "b", "c"], [0, 1, 2], 2, {}, "dps", timeout_s=0.5)
    finally:
        ray.kill(worker)
