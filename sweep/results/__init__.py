"""Results: the figures registry, the trial-row codec, Pareto fronts, reports and the MLflow
bookkeeping."""
