"""Reporting: tables, the results JSON, HTML, baselines and the CI gate, snapshots, atomic file writing."""
