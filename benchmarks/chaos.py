"""Chaos: the tiny NFT recipe on a simulated 3-node cluster, undisturbed and then under kills at a seeded schedule.

    python benchmarks/chaos.py --json /tmp/chaos.json [--kills 8] [--seed 0] [--steps 30] [--plot docs/chaos.png]
        [key=value ...]

The cluster (actors.simcluster.SimCluster): a head (the driver), a node offering `rollout` and `value` (the rollout
worker and both value actors) and a node offering `learner`. The same run (recipes/nft_flux.py, tiny world,
train.async_staleness=1, a checkpoint every 2 iterations) goes twice, as a `ray job`-like subprocess joined to the
cluster: undisturbed, then with `--kills` kills cycling through four kinds in a seeded order, each a seeded
0.2-2 s after the run has completed one more iteration (counted in its metrics.jsonl):

- rollout / value: SIGKILL of a rollout worker's / value actor's process (Ray restarts it, the lost tasks re-run);
- learner: SIGKILL of a learner rank (the run restarts from its latest checkpoint);
- node: a node's processes killed (a preempted machine), the rollout+value node and the learner's in turn, and
  a replacement node with the same resources added, as an autoscaler would (the actors are re-placed there; the
  learner's loss restarts the run from its checkpoint).

JSON: kills_injected, kills_survived (the run went on to complete two more iterations after the kill and ended with
exit status 0), per-kind counts, learner_restarts (runs restarted from a checkpoint), actor_restarts (Ray's
restarts of rollout workers / value actors, from the GCS actor table), prompts_lost / prompts_twice (the (prompt, seed) pairs of the undisturbed run's
ledger missing from / repeated in the chaos run's), final_weights_equal (every learner tensor of the final
checkpoints equal bit for bit), wall_undisturbed_s, wall_chaos_s, overhead (chaos / undisturbed - 1), and each kill
(kind, target, seconds into the run, recovery_s: until the run has completed two more iterations). --plot: the
iteration each run is at against time, kills marked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import bootstrap  # noqa: F401  (the repository root on sys.path)

from rlstitch.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("rollout", "value", "learner", "node")
ACTOR_CLASS = {"rollout": "RolloutWorker", "value": "ValueActor", "learner": "RayTrainWorker"}
# one rollout worker + the training and evaluation value actors; the learner
NODES = {"rv": {"CPU": 2, "rollout": 1, "value": 2}, "learner": {"CPU": 2, "learner": 1}}


def recipe_args(out: Path, steps: int, kills: int, extra: list[str]) -> list[str]:
    """The tiny NFT run of both passes (as many learner restarts allowed as there are kills)."""
    return [f"out={out}", f"train.steps={steps}", "train.async_staleness=1", "checkpoint.every=2", "checkpoint.keep=0",
            "checkpoint.resume=false", f"checkpoint.restarts={max(kills, 3)}", "eval.every=0", "eval.num_prompts=16",
            "eval.grid=0", "log.wandb=false", "log.progress=false", *extra]


def schedule(kills: int, seed: int) -> list[dict]:
    """The kills in order: kinds cycling through KINDS (shuffled per cycle), each a seeded delay after the next
    completed iteration (the following iteration is then under way)."""
    rng = random.Random(seed)
    kinds: list[str] = []
    while len(kinds) < kills:
        kinds += rng.sample(KINDS, len(KINDS))
    return [{"kind": k, "wait_iterations": 1, "delay_s": round(rng.uniform(0.2, 2.0), 2)}
            for k in kinds[:kills]]


def iteration_lines(out: Path) -> list[str]:
    """The run's metrics.jsonl lines of training iterations (repeated ones after a learner restart included)."""
    path = out / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if '"train/reward_mean"' in line] if path.exists() else []


def iterations_done(out: Path) -> int:
    """Training iterations the run has completed so far, counting repeated ones again."""
    return len(iteration_lines(out))


def iteration_now(out: Path) -> int:
    """The iteration the run is at (it goes back to the checkpoint's after a learner restart)."""
    lines = iteration_lines(out)
    return int(json.loads(lines[-1])["train/iteration"]) if lines else 0


class Run:
    """The recipe as a subprocess joined to the cluster (as `ray job submit` runs it), its output in <out>.log;
    a thread samples its progress (seconds, iteration) twice a second."""

    def __init__(self, address: str, args: list[str], out: Path):
        env = os.environ | {"RAY_ADDRESS": address, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
        self.out, self.curve = out, [(0.0, 0)]
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(out.parent / f"{out.name}.log", "w")
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "nft_flux.py"), *args], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        """Record (seconds, iteration) whenever the run's iteration changes, until it ends."""
        while self.running():
            n = iteration_now(self.out)
            if n != self.curve[-1][1]:
                self.curve.append((round(self.elapsed(), 2), n))
            time.sleep(0.5)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.start

    def wait(self, timeout: float) -> int:
        """The exit status (the run is killed after `timeout` seconds)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()

    def running(self) -> bool:
        """True while the subprocess runs."""
        return self.proc.poll() is None


def wait_for(cond, run: Run, timeout: float) -> bool:
    """Poll `cond()` every 0.2 s while the run lives; False after `timeout` s or when the run ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.running():
        if cond():
            return True
        time.sleep(0.2)
    return bool(cond())


def alive_actors(sim, cls: str) -> list[dict]:
    """The alive actors of a class on the cluster, from its GCS actor table (this process needs no driver)."""
    return [a for a in sim.cluster.global_state.actor_table(None).values()
            if a["ActorClassName"].endswith(cls) and a["State"] == "ALIVE" and a["Pid"]]


def inject(kind: str, sim, rng: random.Random) -> str | None:
    """Kill one target of `kind`; returns what was killed (None: no such target alive right now)."""
    if kind == "node":  # the rollout+value node, then the learner's, and so on
        role = ("rv", "learner")[len(sim.killed) % 2]
        name = next(n for n in sim.nodes if n.startswith(role))
        node_id = sim.nodes[name].node_id[:8]
        sim.kill_node(name)
        sim.add_node(f"{role}{len(sim.killed)}", NODES[role])  # the autoscaler's replacement
        return f"node {name} ({node_id})"
    actors = alive_actors(sim, ACTOR_CLASS[kind])
    if not actors:
        return None
    a = rng.choice(sorted(actors, key=lambda x: x["ActorID"]))
    try:
        os.kill(a["Pid"], signal.SIGKILL)
    except ProcessLookupError:
        return None
    return f"{a['ActorClassName']} pid {a['Pid']} ({a['ActorID'][:8]})"


def chaos_run(sim, args: list[str], out: Path, plan: list[dict], seed: int, timeout: float) -> dict:
    """The run under the planned kills; returns its exit status, wall time, progress curve and the kills."""
    rng = random.Random(seed + 1)
    run = Run(sim.cluster.address, args, out)
    kills = []
    for k, step in enumerate(plan):
        target = iterations_done(out) + step["wait_iterations"]
        if not wait_for(lambda n=target: iterations_done(out) >= n, run, timeout):
            break  # the run ended (or stalled) before this kill
        time.sleep(step["delay_s"])
        before, at = iterations_done(out), run.elapsed()
        what = None
        deadline = time.monotonic() + 60
        while what is None and time.monotonic() < deadline and run.running():  # a restarting target: wait for it
            what = inject(step["kind"], sim, rng)
            if what is None:
                time.sleep(0.5)
        if what is None:
            break
        # two more iterations: with one iteration's rollouts in flight, the next may have been done before the kill
        recovered = wait_for(lambda n=before: iterations_done(out) >= n + 2, run, timeout)
        kills.append({"kind": step["kind"], "target": what, "at_s": round(at, 2), "after_iteration": before,
                      "recovery_s": round(run.elapsed() - at, 2) if recovered else None})
        print(f"kill {k + 1}/{len(plan)}: {step['kind']:8s} {what} at {at:.1f} s -> "
              f"{'recovered in %.1f s' % (run.elapsed() - at) if recovered else 'no recovery'}", flush=True)
    status = run.wait(timeout)
    return {"status": status, "wall_s": round(run.elapsed(), 1), "kills": kills, "curve": run.curve,
            "actor_restarts": actor_restarts(sim)}


def actor_restarts(sim) -> dict[str, int]:
    """How often Ray restarted the rollout workers and value actors, from the GCS actor table."""
    table = sim.cluster.global_state.actor_table(None).values()
    return {kind: sum(a["NumRestarts"] for a in table if a["ActorClassName"].endswith(ACTOR_CLASS[kind]))
            for kind in ("rollout", "value")}


def undisturbed(sim, args: list[str], out: Path, timeout: float) -> dict:
    """The same run without kills."""
    run = Run(sim.cluster.address, args, out)
    status = run.wait(timeout)
    return {"status": status, "wall_s": round(run.elapsed(), 1), "curve": run.curve}


def ledger_pairs(out: Path) -> Counter:
    """(prompt, seed) pairs that reached the learner, with how often."""
    from actors.trainer.state import read_ledger

    return Counter((p, s) for r in read_ledger(out / "ledger.jsonl") for p, s in zip(r.prompts, r.seeds))


def same_weights(a: Path, b: Path) -> bool:
    """Every learner tensor of two checkpoints equal bit for bit (the in-flight adapters, "sampled-*", aside)."""
    import torch
    from safetensors.torch import load_file

    if not (a.exists() and b.exists()):
        return False
    x, y = load_file(a), load_file(b)
    keys = {k for k in x if not k.startswith("sampled-")}
    return keys == {k for k in y if not k.startswith("sampled-")} and all(torch.equal(x[k], y[k]) for k in keys)


def report(ref: dict, chaos: dict, ref_out: Path, chaos_out: Path, steps: int, plan: list[dict]) -> dict:
    """The JSON report of the two runs."""
    expected, got = ledger_pairs(ref_out), ledger_pairs(chaos_out)
    ok = chaos["status"] == 0
    survived = [k for k in chaos["kills"] if ok and k["recovery_s"] is not None]
    final = Path("checkpoints") / f"step-{steps}" / "state.safetensors"
    restarts = sum("restart" in line and "learner lost" in line
                   for line in (chaos_out.parent / f"{chaos_out.name}.log").read_text().splitlines())
    return {"kills_planned": len(plan), "kills_injected": len(chaos["kills"]), "kills_survived": len(survived),
            "by_kind": dict(Counter(k["kind"] for k in chaos["kills"])), "learner_restarts": restarts,
            "actor_restarts": chaos.get("actor_restarts", {}),
            "prompts_expected": sum(expected.values()), "prompts_lost": sum((expected - got).values()),
            "prompts_twice": sum((got - expected).values()),
            "final_weights_equal": same_weights(ref_out / final, chaos_out / final),
            "exit_status": {"undisturbed": ref["status"], "chaos": chaos["status"]},
            "wall_undisturbed_s": ref["wall_s"], "wall_chaos_s": chaos["wall_s"],
            "overhead": round(chaos["wall_s"] / ref["wall_s"] - 1, 3), "steps": steps, "kills": chaos["kills"],
            "curves": {"undisturbed": ref["curve"], "chaos": chaos["curve"]}}


def plot(path: Path, r: dict) -> None:
    """The run's iteration against seconds (a learner restart goes back to its checkpoint), kills marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, curve in r["curves"].items():
        ax.step([t for t, _ in curve], [n for _, n in curve], where="post", label=name)
    colors = dict(zip(KINDS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for k in r["kills"]:
        ax.axvline(k["at_s"], color=colors[k["kind"]], ls="--", lw=1)
    ax.set_xlabel("seconds (chaos run: kills as dashed lines, blue rollout / orange value / green learner / "
                  "red node)", fontsize=8)
    ax.set_ylabel("iteration")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(r: dict) -> str:
    """The README table."""
    kinds = ", ".join(f"{k} {r['by_kind'].get(k, 0)}" for k in KINDS)
    return "\n".join([
        "| kills injected | survived | by kind | prompts lost | counted twice | final weights equal | "
        "wall undisturbed / chaos | overhead |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['kills_injected']} | {r['kills_survived']} | {kinds} | {r['prompts_lost']} | {r['prompts_twice']} | "
        f"{r['final_weights_equal']} | {r['wall_undisturbed_s']} s / {r['wall_chaos_s']} s | "
        f"{r['overhead'] * 100:+.0f}% |"])


def main(argv: list[str] | None = None) -> dict:
    """Both runs on one simulated cluster; prints the table, writes the JSON (and plot)."""
    from actors.simcluster import SimCluster

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30, help="training iterations of each run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run counts as hung")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--out", type=Path, help="run folders (default: a temp dir)")
    a, extra = ap.parse_known_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="chaos-"))
    plan = schedule(a.kills, a.seed)
    t0 = time.monotonic()
    with SimCluster(NODES, head_cpus=2, connect=False) as sim:
        print(f"cluster up in {time.monotonic() - t0:.1f} s: head + {sorted(NODES)}; plan: "
              f"{[p['kind'] for p in plan]}", flush=True)
        ref = undisturbed(sim, recipe_args(out / "undisturbed", a.steps, a.kills, extra), out / "undisturbed", a.timeout)
        print(f"undisturbed: exit {ref['status']} in {ref['wall_s']} s", flush=True)
        chaos = chaos_run(sim, recipe_args(out / "chaos", a.steps, a.kills, extra), out / "chaos", plan, a.seed, a.timeout)
    r = report(ref, chaos, out / "undisturbed", out / "chaos", a.steps, plan)
    r["total_s"] = round(time.monotonic() - t0, 1)
    print(table(r))
    print(json.dumps({k: v for k, v in r.items() if k not in ("kills", "curves")}, indent=1))
    if a.json:
        atomic_write_text(a.json, json.dumps(r, indent=1))
    if a.plot:
        plot(a.plot, r)
    return r


if __name__ == "__main__":
    main()
