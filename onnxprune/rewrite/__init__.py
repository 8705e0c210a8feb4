"""Graph rewrites that apply a plan: channel slicing (and, later, low-rank factorization)."""

from .channels import apply_channel_plan, keep_masks

__all__ = ["apply_channel_plan", "keep_masks"]
