"""Tools shared by the tests, the benchmarks and the Docker-free stack: starting and stopping
real servers on loopback, and driving a real browser. Not part of the loopwatch package."""
