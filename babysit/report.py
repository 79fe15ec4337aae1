"""What a run leaves for people: stage notes and plots for the dashboard, the report, export."""

from __future__ import annotations

from typing import Any


def publish_stage(ctx: Any, result: Any) -> None:
    """Called after each stage with its StageResult; writes notes and plot artifacts."""
