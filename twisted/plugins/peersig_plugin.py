from twisted.application.service import ServiceMaker

peersig = ServiceMaker(
    "peersig", "peersig.tap", "PeerJS-compatible WebRTC signaling server", "peersig"
)
