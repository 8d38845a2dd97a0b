"""Benchmarks of peersig against the reference PeerJS server (npm ``peer``): ``python -m bench``."""
