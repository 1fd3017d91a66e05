"""Tools over measure and estimate: the contradiction check, batch-size advisor, fuzz helper and summary."""
