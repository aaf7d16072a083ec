"""Runners: the run loop, run records, measurements, reports and loggers."""
