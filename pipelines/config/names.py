"""Names the configuration validates against and the command line offers: benchmarks and MME's subtasks."""

from __future__ import annotations

LLM_BENCHMARKS = ("mme", "vqa", "captions")  # asked of the language model
ZERO_SHOT = {"zeroshot-image": "image", "zeroshot-audio": "audio", "zeroshot-point": "point"}  # of the encoders
BENCHMARKS = (*LLM_BENCHMARKS, *ZERO_SHOT)

# The folder names of MME_Benchmark_release_version, spelt as its eval_tool/calculation.py names the subtasks.
MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION
