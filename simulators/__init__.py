"""Simulated devices and fleets (swtpm), the demo, and the benchmarks."""
