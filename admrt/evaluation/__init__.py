"""admrt.evaluation: the ADM evaluator metrics (FID, sFID, IS, precision/recall)."""
