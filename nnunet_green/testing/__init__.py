"""Helpers for tests and benchmarks, not part of the product API: model folders shaped like published ones
(TotalSegmentator's), written with random weights so that nothing has to be downloaded. Names here may change
without notice."""
