"""Baseline workers (plain boto3) that the benchmarks compare cpworker against."""
