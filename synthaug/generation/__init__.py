"""Generators (Stable-Diffusion family, pixel DDPM) and the background GenerationWorker.

Heavy libraries (torch, diffusers) are imported only by the backends, when a generator is built.
"""

from synthaug.generation.base import GeneratedBatch, Generator
from synthaug.generation.loading import generator_from_spec, load_generator
from synthaug.generation.multi import MultiAdapterGenerator
from synthaug.generation.worker import GenerationWorker

__all__ = ["GeneratedBatch", "GenerationWorker", "Generator", "MultiAdapterGenerator", "generator_from_spec", "load_generator"]
