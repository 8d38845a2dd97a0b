from twisted.application.service import ServiceMaker

from peersig.auth import HMACAuthorizer, OpenAuthorizer

peersig = ServiceMaker(
    "peersig", "peersig.tap", "PeerJS-compatible WebRTC signaling server", "peersig"
)
peersig_open = OpenAuthorizer()
peersig_hmac = HMACAuthorizer()
