"""Decentralized (gossip, no server) bilevel algorithms on stacked node state."""

from fedopt.algorithms.decentralized.dbo import dbo, dbo_stochastic
from fedopt.algorithms.decentralized.ma_dsbo import ma_dsbo, ma_dsbo_gt

__all__ = ["dbo", "dbo_stochastic", "ma_dsbo", "ma_dsbo_gt"]
