"""Datasets (``digits``, ``npz:PATH``, ``csv:PATH``, ``text:PATH``, ``pydoc-topics``) and
deterministic partitioning."""

from splitkd.data.partition import EdgeSplit, Shard, edge_split, parse_shard
from splitkd.data.specs import Dataset, load_dataset

__all__ = ["Dataset", "EdgeSplit", "Shard", "edge_split", "load_dataset", "parse_shard"]
