"""Centralized bilevel solvers (every round uses the whole federation): tuning-free D-TFBO and
S-TFBO, fixed-step AID and SOBA. They are also the one-client / one-node references."""

from fedopt.algorithms.centralized.tfbo import aid, d_tfbo, s_tfbo, soba

__all__ = ["aid", "d_tfbo", "s_tfbo", "soba"]
