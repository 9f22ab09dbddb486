"""The base of every config section, and the names and patterns several sections share."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

DEMO_CONFIG = "demo.yaml"
Conversation = Literal["turns", "first", "whole"]  # how stage 2 makes samples of a conversation (StageConfig)
SOURCE_NAME = r"^[a-z0-9][a-z0-9_]*$"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
