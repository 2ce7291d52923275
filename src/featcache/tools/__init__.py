"""Tools around the pipeline: the demo, the benchmarks and the reference loops they compare against."""
