"""nvfp4-verify harness: checkpoint loading, stages, metrics, reports, CLI and the test suite."""
