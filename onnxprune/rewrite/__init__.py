"""Graph rewrites that apply a plan: channel slicing and per-unit weight scales."""

from .channels import apply_channel_plan, keep_masks
from .scale import apply_unit_scales

__all__ = ["apply_channel_plan", "apply_unit_scales", "keep_masks"]
