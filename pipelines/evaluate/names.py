"""The benchmarks `ibllm evaluate --benchmark` knows (importable without torch, for the command line)."""

from __future__ import annotations

LLM_BENCHMARKS = ("mme", "vqa", "captions")  # asked of the language model
ZERO_SHOT = {"zeroshot-image": "image", "zeroshot-audio": "audio", "zeroshot-point": "point"}  # of the encoders
BENCHMARKS = (*LLM_BENCHMARKS, *ZERO_SHOT)
