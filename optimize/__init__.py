"""Composing the layers into runs: ground-truth demos, the generate and evaluate jobs, and the
compile into weights (misstep.optimize.compile; the rounds loop builds on it)."""

from misstep.optimize.demos import attach_demos, ground_truth_chat_data, ground_truth_demos

__all__ = ["attach_demos", "ground_truth_chat_data", "ground_truth_demos"]
