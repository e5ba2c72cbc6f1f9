"""Export and serving: checkpoints, model cards, picking the trial to ship."""
