"""Baseline brokers, measured by the same load generator in the same run, for comparison only."""
