"""The single-controller trainer every training recipe runs (recipes/<name>.py: main -> `run`).

world.py     the config and the actor groups a run talks to (rollout, value, learner), started once
state.py     RunState: iteration, weights version, RNG, prompt stream, evaluations (all checkpointed); Draw
pipeline.py  the draws in flight (bounded staleness) and their rollout / score tasks
report.py    evaluation, per-iteration metrics, the final summary
loop.py      `run` (restarts after a lost learner) and the Trainer's phases: draw, roll out, score, learn,
             publish, evaluate, checkpoint
"""
