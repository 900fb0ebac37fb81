"""Generators (Stable-Diffusion family, pixel DDPM) and the background GenerationWorker."""

from synthaug.generation.base import GeneratedBatch, Generator, generator_from_spec, load_generator

__all__ = ["GeneratedBatch", "Generator", "generator_from_spec", "load_generator"]
