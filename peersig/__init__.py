"""peersig: a PeerJS-compatible WebRTC signaling server on Twisted and Autobahn."""

__version__ = "0.1.0"
