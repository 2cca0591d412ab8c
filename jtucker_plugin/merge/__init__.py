"""Merging task models: layers shared by all tasks (hard sharing), later with per-task parts."""

from jtucker_plugin.merge.share import hard_share

__all__ = ["hard_share"]
