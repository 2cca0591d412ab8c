"""Searches over decomposition choices; importing it registers the rank strategy ``ga``."""

from jtucker_plugin.search.ga import GAConfig, GAResult, ga_ranks, search_ranks

__all__ = ["GAConfig", "GAResult", "ga_ranks", "search_ranks"]
