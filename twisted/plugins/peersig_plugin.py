from twisted.application.service import ServiceMaker

from peersig.auth import HMACAuthorizer, OpenAuthorizer
from peersig.jwtauth import JWTAuthorizer

peersig = ServiceMaker(
    "peersig", "peersig.tap", "PeerJS-compatible WebRTC signaling server", "peersig"
)
peersig_open = OpenAuthorizer()
peersig_hmac = HMACAuthorizer()
peersig_jwt = JWTAuthorizer()
