"""An example plug-in package for fedopt: an algorithm and a problem written outside fedopt.

Run them by dotted path (``"my_method.algorithm:fed_soba"``) from this folder with no install, or
by their entry-point names (``fed_soba``, ``mlp_hyper_representation``) once installed.
"""
