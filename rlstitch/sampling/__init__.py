"""Flow-matching samplers and text-to-image generation with classifier-free guidance."""

from rlstitch.sampling.flow import FlowSampler, SampleOutput, forward_noise, time_grid, tweedie
from rlstitch.sampling.generate import cfg_velocity, generate

__all__ = ["FlowSampler", "SampleOutput", "cfg_velocity", "forward_noise", "generate", "time_grid", "tweedie"]
