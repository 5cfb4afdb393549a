"""Keel PDP: a spend-control policy decision point for LLM traffic."""

__version__ = "0.1.0"
