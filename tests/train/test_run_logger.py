"""RunLogger: eval sample grids and the clean reward reach wandb (offline) and <out>/samples/."""

from __future__ import annotations

import json
import struct

import numpy as np
from PIL import Image

from rlstitch.train.run import RunLogger

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte "W&B" header, then 32 KiB blocks of chunks
FULL, LAST = 1, 4


def wandb_records(path) -> list:
    """Every protobuf Record of an offline run's .wandb file (chunks reassembled, CRCs not checked)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline run, {key: decoded value}; nested keys joined with '/'."""
    (log,) = run_dir.glob("run-*.wandb")
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(log) if r.WhichOneof("record_type") == "history"]


def test_eval_grids_and_clean_reward_reach_wandb_offline_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    rng = np.random.default_rng(0)
    grids = {step: rng.integers(0, 256, (18, 35, 3), dtype=np.uint8) for step in (0, 10)}
    rewards = {0: 0.25, 10: 0.5}
    log = RunLogger(tmp_path, {"seed": 0}, total=10, progress=False)
    for step in (0, 10):
        log.log({"eval/clean_reward": rewards[step]}, step=step, images={"eval/samples": (grids[step], "a red circle")})
        log.log({"train/loss": 1.0}, step=step + 1)  # a row without images must not write a grid
    log.finish({"steps": 10})

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = [r for r in wandb_history(run) if "eval/clean_reward" in r]
    assert [(r["_step"], r["eval/clean_reward"]) for r in rows] == [(0, 0.25), (10, 0.5)]
    for r in rows:
        assert r["eval/samples/_type"] == "image-file" and r["eval/samples/caption"] == "a red circle"
        media = np.asarray(Image.open(run / "files" / r["eval/samples/path"]).convert("RGB"))
        assert np.array_equal(media, grids[r["_step"]])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["eval-samples-step0.png",
                                                                        "eval-samples-step10.png"]
    for step, grid in grids.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / f"eval-samples-step{step}.png")), grid)
