"""The parts of fit()'s loop (tinytale/train.py): one step, the non-finite guard, the epoch's
running sums, and the checkpoint and stop policy."""
