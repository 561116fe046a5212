"""Composing the layers into runs: ground-truth demos and the generate job (compile and rounds come next)."""

from misstep.optimize.demos import attach_demos, ground_truth_demos

__all__ = ["attach_demos", "ground_truth_demos"]
