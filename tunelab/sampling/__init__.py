"""Sampling: per-request knobs (`SamplingParams`) and the batched chain that applies them (`Sampler`)."""

from tunelab.sampling.params import SamplingParams
from tunelab.sampling.sampler import SampleResult, Sampler, SamplerState, StageTrace

__all__ = ["SampleResult", "Sampler", "SamplerState", "SamplingParams", "StageTrace"]
