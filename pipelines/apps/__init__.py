"""The paper's applications: any-to-image generation (imagine) and grounding answers in the input image (ground)."""
