"""Ground truth no model wrote: the arithmetic oracle, the deterministic error injector,
scenario checks, evaluation with confidence intervals, the judge as a DSPy metric, plots."""
