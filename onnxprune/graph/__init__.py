"""Dependency analysis over ONNX graphs: channel groups that must shrink together."""

from .analysis import Analysis, AnalysisContext, ChannelMap, Group, Source, analyze

__all__ = ["Analysis", "AnalysisContext", "ChannelMap", "Group", "Source", "analyze"]
